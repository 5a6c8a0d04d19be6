"""Generation speed: molmo2_jax `model.generate` against transformers' `Molmo2ForConditionalGeneration.generate`
on the same random checkpoint files and the same processor outputs, greedy, float32 on CPU, in one process.

    python bench/bench_generation.py [--configs tiny,65m,80m] [--batches 1,8] [--new-tokens 32] [--repeats 3]
                                     [--slots 128,1024,4096] [--slot-configs tiny,80m] [--slot-repeats 5]

Prompts: per row one 640x480 random image (5 crops, 757 tokens) between random text tokens, rows left padded
(issue 23's setup). Each row decodes exactly --new-tokens tokens (no EOS; ours `eos_ids=[-1]`, the reference
`eos_token_id=None`), and the tokens of both are checked to be identical. Ours and the reference alternate
call by call; one warm-up call each (ours compiles there, reported as "compile s"), then the median of
--repeats calls of:
  generate   the whole call (ours: `model.generate` with input checks, padding and transfers);
  decode     the tokens after the first: (time of the last new token - time of the first) / (new tokens - 1),
             in ms per step (ours: `result.decode_seconds`; the reference: read by a stopping criterion);
  ratio      reference time / ours (> 1: ours is faster).
Slots table (--slots): decode ms per step for a 40-token text prompt with our cache forced to N slots
(`generate(cache_slots=N)`), next to the reference's decode ms per step for the same prompt (its cache grows
with the tokens; it has no slots), median of --slot-repeats calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NEVER = -1  # an EOS id no model emits

# (vision / connector overrides, text overrides) of tests/ref_model.tiny_config
CONFIGS = {
    "tiny": ({}, {}),
    # issue 23: ViT 6 x 384, decoder 8 x 768 with GQA 12/4
    "65m": (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=6, head_dim=64),
            dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_hidden_layers=8,
                 intermediate_size=1536, vocab_size=8000)),
    "80m": ({}, dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                     num_hidden_layers=12, intermediate_size=2048, vocab_size=32000)),
}


def build(name: str, directory: Path):
    """Reference model (random, saved at `directory`) and ours loaded from the same files."""
    import torch
    from ref_model import tiny_config
    from transformers import Molmo2ForConditionalGeneration

    import molmo2_jax

    vision, text = CONFIGS[name]
    config = tiny_config("qwen3", **text)
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    config.adapter_config.hidden_size = config.vision_config.hidden_size
    config.adapter_config.text_hidden_size = config.text_config.hidden_size
    torch.manual_seed(0)
    ref = Molmo2ForConditionalGeneration(config).eval()
    ref.save_pretrained(directory)
    return ref, molmo2_jax.load(directory)


def image_prompts(batch: int) -> dict[str, np.ndarray]:
    """`batch` one-image prompts (640x480, different images and text), left padded."""
    from ref_model import collated, image_inputs, random_image

    return collated([image_inputs([random_image(640, 480, seed=i)], seed=i) for i in range(batch)], "left")


def text_prompts(batch: int, length: int = 40) -> dict[str, np.ndarray]:
    from ref_model import text_ids

    rng = np.random.default_rng(0)
    ids = np.asarray([text_ids(rng, length) for _ in range(batch)])
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def for_reference(inputs):
    from ref_model import for_reference

    return for_reference({k: v for k, v in inputs.items() if not k.startswith("video")})


def ours(model, inputs, new_tokens: int, **kwargs):
    def run():
        start = time.perf_counter()
        result = model.generate(inputs, max_new_tokens=new_tokens, eos_ids=[NEVER], **kwargs)
        seconds = time.perf_counter() - start
        assert all(len(t) == new_tokens for t in result.token_ids)
        return np.stack(result.token_ids), seconds, result.decode_seconds / (new_tokens - 1), result.compile_seconds
    return run


def reference(ref, inputs, new_tokens: int):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in for_reference(inputs).items()}

    def run():
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(**tensors, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
        seconds = time.perf_counter() - start
        assert len(clock.times) == new_tokens
        return (out[:, -new_tokens:].numpy(), seconds, (clock.times[-1] - clock.times[0]) / (new_tokens - 1), 0.0)
    return run


def race(runs: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Alternate the runs (one warm-up each, then `repeats` rounds); medians per run, and its tokens."""
    results = {name: [] for name in runs}
    tokens, compile_seconds = {}, {}
    for attempt in range(repeats + 1):
        for name, run in runs.items():
            out, seconds, step, compiled = run()
            if attempt == 0:
                tokens[name], compile_seconds[name] = out, compiled
            else:
                results[name].append((seconds, step))
    return {name: {"call": statistics.median(r[0] for r in rows), "step": statistics.median(r[1] for r in rows),
                   "tokens": tokens[name], "compile": compile_seconds[name]} for name, rows in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,65m,80m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", default="128,1024,4096")
    parser.add_argument("--slot-configs", default="tiny,80m")
    parser.add_argument("--slot-repeats", type=int, default=5, help="short prompts: more repeats are cheap")
    args = parser.parse_args()

    import jax
    import torch

    from molmo2_jax.params import param_shapes

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; float32; {args.new_tokens} new tokens; median of {args.repeats}")
    batches = [int(b) for b in args.batches.split(",")]
    slots = [int(s) for s in args.slots.split(",")] if args.slots else []
    table = [f"{'config':<6}{'params':>7}{'batch':>6}{'prompt':>7} | {'compile s':>9} | {'generate s ours':>15}"
             f"{'ref':>8}{'ratio':>7} | {'decode ms/step ours':>19}{'ref':>8}{'ratio':>7} | tokens"]
    slot_table = [f"{'config':<6}{'batch':>6} | " + "".join(f"{f'{n} slots':>12}" for n in slots)
                  + f" | {'ref':>8} | {f'{slots[-1]}/{slots[0]}' if slots else '':>10}"]
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench_gen_{name}_") as tmp:
            ref, model = build(name, Path(tmp))
            n_params = sum(int(np.prod(s)) for s in param_shapes(model.config).values())
            for batch in batches:
                inputs = image_prompts(batch)
                r = race({"ours": ours(model, inputs, args.new_tokens),
                          "ref": reference(ref, inputs, args.new_tokens)}, args.repeats)
                same = np.array_equal(r["ours"]["tokens"], r["ref"]["tokens"])
                table.append(f"{name:<6}{n_params / 1e6:6.1f}M{batch:>6}{inputs['input_ids'].shape[1]:>7} | "
                             f"{r['ours']['compile']:9.1f} | {r['ours']['call']:15.3f}{r['ref']['call']:8.3f}"
                             f"{r['ref']['call'] / r['ours']['call']:6.2f}x | {r['ours']['step'] * 1e3:19.2f}"
                             f"{r['ref']['step'] * 1e3:8.2f}{r['ref']['step'] / r['ours']['step']:6.2f}x | "
                             f"{'identical' if same else 'DIFFERENT'}")
                print(table[-1], flush=True)
                if name not in args.slot_configs.split(",") or not slots:
                    continue
                inputs = text_prompts(batch)
                runs = {n: ours(model, inputs, args.new_tokens, cache_slots=n) for n in slots}
                r = race({**runs, "ref": reference(ref, inputs, args.new_tokens)}, args.slot_repeats)
                steps = [r[n]["step"] * 1e3 for n in slots]
                slot_table.append(f"{name:<6}{batch:>6} | " + "".join(f"{s:12.2f}" for s in steps)
                                  + f" | {r['ref']['step'] * 1e3:8.2f} | {steps[-1] / steps[0]:9.2f}x")
                print(slot_table[-1], flush=True)
    print("\n" + "\n".join(table))
    if len(slot_table) > 1:
        print("\ndecode ms per step vs cache slots (40-token text prompt; ref: its decode ms per step)\n"
              + "\n".join(slot_table))


if __name__ == "__main__":
    main()
