"""Generation speed: molmo2_jax jitted prefill + decode loop against the transformers reference `generate`, on
the same random model and the same image prompts, float32 on CPU.

    python bench/bench_generation.py [--new-tokens 16] [--repeats 2] [--configs tiny,100m]

Prefill = time to the first new token (ours: the compiled prefill; reference: from the `generate` call to its
first stopping-criteria check). Decode tokens/s = batch * (new tokens - 1) / time from the first to the last
new token. Compilation is timed separately and excluded. Greedy without EOS, so every row decodes exactly
--new-tokens tokens on both sides.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NEVER = -1  # an EOS id no model emits

CONFIGS = {  # text overrides of tests/ref_model.tiny_config
    "tiny": {},
    "100m": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_hidden_layers=12,
                 intermediate_size=2048, vocab_size=32000),
}


def build(name: str, directory: Path):
    """Reference model (random, saved at `directory`) and ours loaded from the same files."""
    import torch
    from ref_model import tiny_config
    from transformers import Molmo2ForConditionalGeneration

    import molmo2_jax

    config = tiny_config("qwen3", **CONFIGS[name])
    config.adapter_config.text_hidden_size = config.text_config.hidden_size
    torch.manual_seed(0)
    ref = Molmo2ForConditionalGeneration(config).eval()
    ref.save_pretrained(directory)
    return ref, molmo2_jax.load(directory)


def prompts(batch: int) -> dict[str, np.ndarray]:
    """`batch` one-image prompts (378x378 images, different random text), collated left padded."""
    from ref_model import image_inputs, random_image

    from molmo2_jax.preprocessing import collate

    examples = [image_inputs([random_image(378, 378, seed=i)], seed=i) for i in range(batch)]
    total = lambda key: sum(ex[key].shape[0] for ex in examples)
    out = collate(examples, seq_len=max(ex["input_ids"].shape[1] for ex in examples),
                  max_crops=total("pixel_values"), max_image_tokens=total("image_token_pooling"), max_frames=0,
                  max_video_tokens=0, pad_token_id=0, padding_side="left")
    return {k: v for k, v in out.items() if not k.endswith("videos") and k != "video_token_pooling"
            and k != "video_grids"}


def reference_times(ref, inputs, new_tokens: int, repeats: int, warm_up: bool) -> tuple[float, float]:
    """Median (prefill seconds, decode seconds for the tokens after the first) of the reference, read from
    a stopping criterion that records the time each new token is done."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    prefill, decode = [], []
    for attempt in range(-warm_up, repeats):  # negative: warm-up
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(**tensors, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                               pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens and len(clock.times) == new_tokens
        if attempt >= 0:
            prefill.append(clock.times[0] - start)
            decode.append(clock.times[-1] - clock.times[0])
    return float(np.median(prefill)), float(np.median(decode))


def our_times(model, inputs, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """(compile seconds, median prefill seconds, median decode seconds) of ours."""
    compile_seconds = model.generate(inputs, max_new_tokens=new_tokens, eos_ids=[NEVER]).compile_seconds
    runs = [model.generate(inputs, max_new_tokens=new_tokens, eos_ids=[NEVER]) for _ in range(repeats)]
    assert all(len(t) == new_tokens for r in runs for t in r.token_ids)
    return (compile_seconds, float(np.median([r.prefill_seconds for r in runs])),
            float(np.median([r.decode_seconds for r in runs])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--configs", default="tiny,100m")
    args = parser.parse_args()

    import jax
    import torch

    from molmo2_jax.params import param_shapes

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; float32; {args.new_tokens} new tokens; median of {args.repeats}")
    header = (f"{'config':<7}{'params':>8}{'batch':>6}{'prompt':>7} | {'compile s':>9} | {'prefill ms ours':>15}"
              f"{'ref':>9}{'ratio':>7} | {'decode tok/s ours':>17}{'ref':>9}{'ratio':>7}")
    rows = []
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench_gen_{name}_") as tmp:
            ref, model = build(name, Path(tmp))
            n_params = sum(int(np.prod(s)) for s in param_shapes(model.config).values())
            for i, batch in enumerate(int(b) for b in args.batches.split(",")):
                inputs = prompts(batch)
                compile_s, prefill, decode = our_times(model, inputs, args.new_tokens, args.repeats)
                ref_prefill, ref_decode = reference_times(ref, inputs, args.new_tokens, args.repeats, warm_up=i == 0)
                decoded = batch * (args.new_tokens - 1)
                rows.append(f"{name:<7}{n_params / 1e6:7.1f}M{batch:>6}{inputs['input_ids'].shape[1]:>7} | "
                            f"{compile_s:9.1f} | {prefill * 1e3:15.1f}{ref_prefill * 1e3:9.1f}"
                            f"{ref_prefill / prefill:6.2f}x | {decoded / decode:17.1f}{decoded / ref_decode:9.1f}"
                            f"{ref_decode / decode:6.2f}x")
                print(rows[-1], flush=True)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
