"""The plain vs the chunked LM-head loss (`loss_chunk_tokens`) in the whole train step, side by side in one run: the
step's median time and the compiled step's memory (XLA's memory_analysis: temporaries and peak), for the tiny
preset and a small text model whose vocabulary makes the loss matter. float32 on CPU, one device, text-only batches.

    python bench/bench_loss.py [--cases tiny,small] [--repeats 3]

The ratio column is plain / chunked (time: > 1 means chunking is faster; memory: > 1 means it saves).

Recorded 2026-12-02 on this repository's shared 2-core machine (load ~20, so times are noisy):

    tiny (4 x 256 tokens, vocab 320, chunks of 256): plain 290.8 ms, temp 20.3 MiB, peak 22.6 MiB |
        chunked 196.0 ms, temp 20.3 MiB, peak 22.6 MiB | ratio time 1.48, temp 1.00, peak 1.00
    small (2 x 2048 tokens, vocab 32768, chunks of 512): plain 51122.6 ms, temp 1381.2 MiB, peak 1596.8 MiB |
        chunked 24905.6 ms, temp 525.2 MiB, peak 740.8 MiB | ratio time 2.05, temp 2.63, peak 2.16
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from molmo2_jax.config import load_preset
from molmo2_jax.sharding import make_mesh
from molmo2_jax.training.config import parse_train_config
from molmo2_jax.training.step import make_train_step

# name: (model preset overrides, rows, tokens per row, loss_chunk_tokens)
CASES = {
    "tiny": ([], 4, 256, 256),
    "small": (["text.hidden_size=256", "adapter.text_hidden_size=256", "text.intermediate_size=1024",
               "text.head_dim=32", "text.vocab_size=32768"], 2, 2048, 512),
}


def batch(config, rows: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, config.text.vocab_size, (1, rows, length)).astype(np.int32)
    return {"input_ids": ids, "target_ids": np.roll(ids, -1, axis=-1),
            "loss_weights": np.ones(ids.shape, np.float32)}


def measure(config, chunk: int, data: dict[str, np.ndarray], repeats: int) -> tuple[float, int, int]:
    """Median seconds of a train step (after a warm-up), XLA's temporary and peak bytes."""
    ts = make_train_step(config, parse_train_config({"model": {"preset": "tiny"}, "loss_chunk_tokens": chunk}),
                         make_mesh({}, jax.devices()[:1]))
    state = ts.init_state(0)
    placed = ts.place_batch(data)
    with ts.context():
        compiled = ts.jit_step(placed).lower(state, placed, ts.base).compile()
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    state, metrics = compiled(state, placed, ts.base)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, placed, ts.base)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times), mem.temp_size_in_bytes, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32, one device")
    mib = lambda n: f"{n / 2**20:8.1f}"
    for name in args.cases.split(","):
        overrides, rows, length, chunk = CASES[name]
        config = load_preset("tiny", [*overrides, "dtype=float32"])
        data = batch(config, rows, length)
        (tp, mp, pp), (tc, mc, pc) = (measure(config, c, data, args.repeats) for c in (0, chunk))
        print(f"{name} ({rows} x {length} tokens, vocab {config.text.vocab_size}, chunks of {chunk}): "
              f"plain {tp * 1e3:8.1f} ms, temp {mib(mp)} MiB, peak {mib(pp)} MiB | chunked {tc * 1e3:8.1f} ms, "
              f"temp {mib(mc)} MiB, peak {mib(pc)} MiB | ratio time {tp / tc:4.2f}, temp {mp / mc:5.2f}, "
              f"peak {pp / pc:5.2f}", flush=True)


if __name__ == "__main__":
    main()
