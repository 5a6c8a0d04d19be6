"""What users call, timed against the transformers reference on identical inputs in one process, float32 on CPU:

    python bench/bench_api.py [--configs tiny,65m,80m] [--batch 1,8] [--repeats 3] [--new-tokens 32] [--skip train]
    python bench/bench_api.py --profile 65m     # the prefill breakdown of docs/performance.md instead

- prefill: `model(inputs)` (jitted, warm; logits back on the host side as a jax array) against the reference
  forward `ref(**inputs)` under `torch.inference_mode`.
- generate: `model.generate(inputs, max_new_tokens=N, eos_ids=[-1])` (wall time of the call, compiled programs
  cached) against `ref.generate(**inputs, min_new_tokens=N, max_new_tokens=N)`, greedy: both make exactly N tokens.
- train: one `TrainStep.step` of `molmo2_jax.training.step` (forward, backward, AdamW with clipping, loss read back)
  on the same example with every next text token as a target, against `ref(**inputs, labels=labels).loss.backward()`
  then `torch.optim.AdamW.step()` (and `zero_grad`), timed after `SETTLE_STEPS` untimed steps of each.

Every timed call alternates ours / reference; the figure is the median of --repeats. ratio = reference time / our
time (> 1: ours faster); after each row, the repeats' ratios and the median minor page faults per call. FLOPs are
the reference's, counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention; the same model and
inputs on both sides), and `%peak` is that FLOP rate over the machine's fp32 matmul peak, measured at the start of
the run as the faster of a 2048^3 matmul in XLA and in torch.

--batch: prefill and generate run at each batch size on that many one-image prompts (different images and text,
the same length, collated as transformers takes them); train always takes one example.

Configs (random weights, saved by the reference and loaded with `molmo2_jax.load`), one 640x480 image (5 crops):
- tiny: tests/ref_model.tiny_config.
- 65m: issue 23's model: ViT 6 x 384 (6 heads), decoder 8 x 768 (GQA 12 / 4 heads of 64, MLP 2048), vocab 300.
- 80m: bench/bench_lora.py's model: ViT 4 x 256, decoder 8 x 512 (GQA 8 / 4, MLP 1536), vocabulary 48k.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NEVER = -1  # an EOS id no model emits

# overrides of tests/ref_model.tiny_config's (text, vision, adapter) sections, in transformers' names
CONFIGS = {
    "tiny": ({}, {}, {}),
    "65m": (dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_hidden_layers=8,
                 intermediate_size=2048),
            dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=6, head_dim=64),
            dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=6, head_dim=64, intermediate_size=1536,
                 text_hidden_size=768)),
    "80m": (dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_hidden_layers=8,
                 intermediate_size=1536, vocab_size=48000),
            dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=64),
            dict(vision_feature_layer=[-1, -3], hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=64, intermediate_size=1024, text_hidden_size=512)),
}


def reference_config(name: str):
    from ref_model import tiny_config

    text, vision, adapter = CONFIGS[name]
    config = tiny_config("qwen3", **text)
    for section, changes in ((config.vision_config, vision), (config.adapter_config, adapter)):
        for key, value in changes.items():
            setattr(section, key, value)
    return config


def build(name: str, directory: Path):
    """The reference model (random, saved at `directory`) and ours loaded from the same files."""
    import torch
    from transformers import Molmo2ForConditionalGeneration

    import molmo2_jax

    torch.manual_seed(0)
    ref = Molmo2ForConditionalGeneration(reference_config(name)).eval()
    ref.save_pretrained(directory)
    return ref, molmo2_jax.load(directory)


def matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """fp32 GFLOP/s of an n^3 matmul in XLA and in torch (median of `repeats`, interleaved)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(ja, ja))
    ours, ref = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: jax.block_until_ready(mm(ja, ja))))
        ref.append(timed(lambda: torch.matmul(ta, ta)))
    return 2 * n**3 / statistics.median(ours) / 1e9, 2 * n**3 / statistics.median(ref) / 1e9


FAULTS: list[int] = []  # minor page faults of each `timed` call, in call order
# untimed train steps of each side before the timed ones: the first steps of one process fault in their
# temporaries again while the heap the two sides share settles (docs/performance.md, "host memory")
SETTLE_STEPS = 2


def timed(fn) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    FAULTS.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return seconds


def flops(fn) -> float:
    """FLOPs torch counts while `fn` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def image_example() -> dict[str, np.ndarray]:
    from ref_model import image_inputs, random_image

    return image_inputs([random_image(640, 480)], text_after=19)


def image_batch(batch: int) -> dict[str, np.ndarray]:
    """`batch` one-image prompts of 774 tokens each (row i: image and text of seed i; row 0 is `image_example`)."""
    from ref_model import image_inputs, padded_batch, random_image

    if batch == 1:
        return image_example()
    return padded_batch([image_inputs([random_image(640, 480, seed=i)], seed=i, text_after=19) for i in range(batch)])


def bench_prefill(model, ref, inputs, repeats):
    import jax
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def ref_call():
        with torch.inference_mode():
            ref(**tensors)

    compile_s = timed(lambda: jax.block_until_ready(model(inputs)))
    ref_call()
    pairs = [(timed(lambda: jax.block_until_ready(model(inputs))), timed(ref_call)) for _ in range(repeats)]
    with torch.inference_mode():
        count = flops(lambda: ref(**tensors))
    return compile_s, pairs, count


def bench_generate(model, ref, inputs, repeats, new_tokens):
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def ours():
        result = model.generate(inputs, max_new_tokens=new_tokens, eos_ids=[NEVER])
        assert all(len(t) == new_tokens for t in result.token_ids)

    def ref_call():
        with torch.inference_mode():
            out = ref.generate(**tensors, min_new_tokens=new_tokens, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)
        assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens

    compile_s = timed(ours)
    ref_call()
    return compile_s, [(timed(ours), timed(ref_call)) for _ in range(repeats)], None


def bench_train(model, ref, inputs, repeats):
    import jax
    import jax.numpy as jnp
    import torch

    from molmo2_jax.training.config import parse_train_config
    from molmo2_jax.training.loss import targets_from_labels
    from molmo2_jax.training.step import make_train_step

    ts = make_train_step(model.config, parse_train_config({"model": {"preset": "tiny"}, "steps": 1000}))
    state = ts.init_state(jax.tree_util.tree_map(jnp.copy, model.params))  # the step donates its state
    # every next text token is a target (special tokens are outside the logits' vocabulary)
    ids = inputs["input_ids"]
    labels = np.where(ids < model.config.text.vocab_size, ids, -100)
    target_ids, loss_weights = targets_from_labels(labels)
    from molmo2_jax.batch import INPUT_KEYS, to_rows

    rows = to_rows(inputs, model.config.tokens.image_patch, model.config.vision.num_patches)  # the batch contract
    batch = {k: v[None] for k, v in rows.items() if k in INPUT_KEYS}
    batch.update(target_ids=target_ids[None], loss_weights=loss_weights[None])

    def ours():
        nonlocal state
        state, metrics = ts.step(state, batch)
        float(metrics["loss"])

    ref.train()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    labels = torch.from_numpy(labels)

    def ref_forward_backward():
        optimizer.zero_grad(set_to_none=True)
        ref(**tensors, labels=labels).loss.backward()

    def ref_call():
        ref_forward_backward()
        optimizer.step()

    compile_s = timed(ours)
    for _ in range(SETTLE_STEPS):
        ours()
        ref_call()
    pairs = [(timed(ours), timed(ref_call)) for _ in range(repeats)]
    count = flops(ref_forward_backward)
    ref.eval()
    return compile_s, pairs, count


def profile(name: str, inputs, repeats: int) -> None:
    """Where one warm prefill spends its time, ours against the reference: the parts (ViT, ViT + connector, whole
    forward; the reference's by forward hooks on its modules), one attention layer of the ViT and of the decoder
    at this input's shapes against torch's SDPA, our XLA ops by kind (leaf events of a `jax.profiler` trace) and
    torch's ops by kind (`torch.profiler`), host work per call and jit cache misses."""
    import glob

    import jax
    import jax.numpy as jnp
    import torch
    from jax.profiler import ProfileData

    from molmo2_jax.model.attention import attention
    from molmo2_jax.model.layers import MaskInfo

    with tempfile.TemporaryDirectory(prefix=f"bench_api_{name}_") as tmp:
        ref, model = build(name, Path(tmp))
    prepared = model.prepare(inputs)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    median = lambda fn: statistics.median(timed(fn) for _ in range(repeats)) * 1e3

    # the parts, ours
    vit = jax.jit(lambda p, x: model.module.apply({"params": p}, x, method="vit_features"))
    visual = jax.jit(lambda p, x, i: model.module.apply({"params": p}, x, i, method="visual_tokens"))
    parts = {"vit": lambda: jax.block_until_ready(vit(model.params, prepared["pixel_values"][0])),  # one row
             "vit+connector": lambda: jax.block_until_ready(
                 visual(model.params, prepared["pixel_values"], prepared["image_token_pooling"])),
             "forward": lambda: jax.block_until_ready(model(inputs))}
    with model.context():
        for fn in parts.values():
            fn()
        ours = {part: median(fn) for part, fn in parts.items()}
    # the parts, reference: wall time between each module's forward pre-hook and hook
    spans: dict[str, list[float]] = {}
    modules = {"vit": ref.model.vision_tower, "connector": ref.model.multi_modal_projector,
               "decoder": ref.model.language_model, "lm_head": ref.lm_head}
    for part, module in modules.items():
        module.register_forward_pre_hook(lambda *_, part=part: spans.setdefault(part, []).append(-time.perf_counter()))
        module.register_forward_hook(lambda *_, part=part: spans[part].__setitem__(-1, spans[part][-1]
                                                                                     + time.perf_counter()))
    with torch.inference_mode():
        ref(**tensors)
        spans.clear()
        whole = median(lambda: ref(**tensors))
    theirs = {part: statistics.median(times) * 1e3 for part, times in spans.items()}
    print(f"{name} prefill parts, ms (median of {repeats}):")
    print(f"  ViT        ours {ours['vit']:8.1f}  ref {theirs['vit']:8.1f}")
    print(f"  connector  ours {ours['vit+connector'] - ours['vit']:8.1f}  ref {theirs['connector']:8.1f}")
    print(f"  decoder+lm ours {ours['forward'] - ours['vit+connector']:8.1f}  ref "
          f"{theirs['decoder'] + theirs['lm_head']:8.1f}  (ours incl. embedding and host work)")
    print(f"  forward    ours {ours['forward']:8.1f}  ref {whole:8.1f}")

    # one attention layer at this input's shapes: ours (the model's path) against SDPA
    c, n_crops, t = model.config, inputs["pixel_values"].shape[0], inputs["input_ids"].shape[1]
    rng = np.random.default_rng(0)
    seg, mm = np.ones((1, t), np.int32), inputs["mm_token_type_ids"].astype(bool)
    idx = np.arange(t)[None].astype(np.int32)
    decoder_mask = MaskInfo(*(jnp.asarray(a) for a in (seg, idx, mm, seg, idx, mm)))
    allowed = torch.from_numpy(np.array(decoder_mask.allowed()))
    for what, (b, length, heads, kv, dim), mask in (
            ("ViT", (n_crops, c.vision.num_patches, c.vision.num_heads, c.vision.num_heads, c.vision.head_dim), None),
            ("decoder", (1, t, c.text.num_heads, c.text.num_kv_heads, c.text.head_dim), decoder_mask)):
        q, k, v = (rng.standard_normal((b, length, h, dim), np.float32) for h in (heads, kv, kv))
        fn = jax.jit(lambda q, k, v, mask=mask: attention(q, k, v, mask, c))
        jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, tq, tk, tv,
                                 attn_mask=None if mask is None else allowed, enable_gqa=heads != kv)
        jax.block_until_ready(fn(jq, jk, jv))
        ours_ms = median(lambda: jax.block_until_ready(fn(jq, jk, jv)))  # noqa: B023
        with torch.inference_mode():
            sdpa()
            ref_ms = median(sdpa)
        print(f"  one {what} attention layer {[b, length, heads, kv, dim]}: ours {ours_ms:.1f} ms, "
              f"SDPA {ref_ms:.1f} ms")

    # our XLA ops by kind: leaf events (ops that contain no other op) of one traced forward
    with tempfile.TemporaryDirectory(prefix="bench_api_trace_") as trace_dir:
        with model.context(), jax.profiler.trace(trace_dir):
            jax.block_until_ready(model(inputs))
        data = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    kinds: dict[str, float] = {}
    skip = ("end: ", "ThreadpoolListener", "ThunkExecutor", "PjitFunction", "CommonPjRt", "Handle", "Allocate",
            "ParseArguments", "PythonRefManager")
    for line in (line for plane in data.planes if plane.name == "/host:CPU" for line in plane.lines
                 if line.name != "python"):  # one line per thread: the op events of the threads XLA runs on
        events = sorted((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                        if not e.name.startswith(skip))
        for i, (start, end, op) in enumerate(events):
            if i + 1 < len(events) and events[i + 1][0] < end:  # contains the next op: a loop, not a leaf
                continue
            kind = ("matmul" if any(s in op for s in ("dot", "ynn", "gemm", "convolution")) else
                    "copy/transpose" if any(s in op for s in ("copy", "transpose")) else
                    "elementwise/reduce fusion" if "fusion" in op or op.startswith("wrapped") else "other")
            kinds[kind] = kinds.get(kind, 0.0) + (end - start) / 1e6
    print("  ours by XLA op kind, thread-ms: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items())))

    # torch's ops by kind
    with torch.inference_mode(), torch.profiler.profile() as prof:
        ref(**tensors)
    groups: dict[str, float] = {}
    for item in prof.key_averages():
        key = ("matmul" if item.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
               else "attention (SDPA)" if "scaled_dot_product" in item.key else "other")
        groups[key] = groups.get(key, 0.0) + item.self_cpu_time_total / 1e3
    print("  ref by aten op (self CPU time), ms: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(groups.items())))

    # host work per call and cache misses
    host_ms = median(lambda: model.prepare(inputs))
    before = model._forward._cache_size()
    with model.context():
        for _ in range(3):
            jax.block_until_ready(model(inputs))
    print(f"  host work per call (prepare: checks, host-to-device): {host_ms:.2f} ms; jit cache misses in 3 warm "
          f"calls: {model._forward._cache_size() - before}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,65m,80m")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes of prefill and generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip", default="", help="comma-separated among prefill,generate,train")
    parser.add_argument("--profile", metavar="CONFIG", help="print the prefill breakdown of CONFIG instead")
    args = parser.parse_args()
    unknown = [c for c in args.configs.split(",") + [args.profile or "tiny"] if c not in CONFIGS]
    unknown += [c for c in filter(None, args.skip.split(",")) if c not in ("prefill", "generate", "train")]
    if unknown:
        parser.error(f"unknown config or call {unknown}; configs are {list(CONFIGS)}, calls prefill,generate,train")
    batches = args.batch.split(",")
    if not all(b.isdigit() and int(b) > 0 for b in batches):
        parser.error(f"--batch {args.batch!r}: expected positive integers separated by commas, e.g. 1,8")
    if args.profile:
        profile(args.profile, image_example(), args.repeats)
        return

    import jax
    import torch

    from molmo2_jax.params import param_shapes

    skip = set(filter(None, args.skip.split(",")))
    peak_ours, peak_ref = matmul_peak()
    peak = max(peak_ours, peak_ref)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; float32; median of {args.repeats}; fp32 2048 matmul: XLA "
          f"{peak_ours:.0f} GFLOP/s, torch {peak_ref:.0f} GFLOP/s (peak = {peak:.0f})", flush=True)
    header = (f"{'config':<6}{'params':>8}{'batch':>6}{'tokens':>7}  {'call':<9}{'compile s':>10}{'ours ms':>10}"
              f"{'ref ms':>10}{'ratio':>7}{'GFLOP':>8}{'ours %peak':>11}{'ref %peak':>10}")
    rows = []
    inputs = {int(b): image_batch(int(b)) for b in batches}
    runs = [(call, b) for call in ("prefill", "generate") for b in inputs] + [("train", 1)]
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench_api_{name}_") as tmp:
            ref, model = build(name, Path(tmp))
            n_params = sum(int(np.prod(s)) for s in param_shapes(model.config).values())
            calls = {"prefill": (bench_prefill, ()), "generate": (bench_generate, (args.new_tokens,)),
                     "train": (bench_train, ())}
            for call, batch in runs:
                if call in skip:
                    continue
                run, extra = calls[call]
                example = image_example() if call == "train" else inputs[batch]
                compile_s, pairs, count = run(model, ref, example, args.repeats, *extra)
                ours, theirs = (statistics.median(x) for x in zip(*pairs))
                ratios = ", ".join(f"{r / o:.2f}" for o, r in pairs)
                faults = FAULTS[-2 * len(pairs):]  # the pairs' calls, ours and the reference's alternating
                faults = f"{statistics.median(faults[::2]):.0f} / {statistics.median(faults[1::2]):.0f}"
                fl = (f"{count / 1e9:8.1f}{count / ours / 1e9 / peak:10.0%} {count / theirs / 1e9 / peak:9.0%}"
                      if count else f"{'':8}{'':11}{'':10}")
                rows.append(f"{name:<6}{n_params / 1e6:7.1f}M{batch:>6}{example['input_ids'].shape[1]:>7}  {call:<9}"
                            f"{compile_s:10.1f}{ours * 1e3:10.1f}{theirs * 1e3:10.1f}{theirs / ours:6.2f}x{fl}")
                print(rows[-1] + f"   (ratios {ratios}; page faults per call, ours / ref: {faults})", flush=True)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
