"""Train-step time and peak RSS of LoRA against full fine-tuning on this machine, for an ~80M-parameter model
(the tiny preset widened: LLM 8 x 512, vocabulary 48k; ViT 4 x 256), each mode in its own process.

    python bench/bench_lora.py [--steps 6] [--rank 16]

Text-only batches of 4 x 256 tokens; the first step (compilation) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHANGES = {"text": {"hidden_size": 512, "intermediate_size": 1536, "num_layers": 8, "num_heads": 8,
                    "num_kv_heads": 4, "head_dim": 64, "vocab_size": 48000},
           "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_layers": 4, "num_heads": 4, "head_dim": 64},
           "adapter": {"vit_layers": [3, 1], "hidden_size": 256, "num_heads": 4, "head_dim": 64,
                       "intermediate_size": 1024, "text_hidden_size": 512}}
BATCH, SEQ = 4, 256


def measure(mode: str, steps: int, rank: int) -> dict:
    import numpy as np

    from molmo2_jax.params import count_params
    from molmo2_jax.training.config import model_config, parse_train_config
    from molmo2_jax.training.step import make_train_step

    train = parse_train_config({"model": {"preset": "tiny", **CHANGES}, "steps": 100,
                                "lora": {"rank": rank if mode == "lora" else 0}})
    config = model_config(train)
    ts = make_train_step(config, train)
    if mode == "lora":
        ts.set_base(0)
    state = ts.init_state(0)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        ids = rng.integers(1, 300, (1, BATCH, SEQ)).astype(np.int32)
        batch = {"input_ids": ids, "target_ids": np.roll(ids, -1, -1), "loss_weights": np.ones(ids.shape, np.float32)}
        start = time.perf_counter()
        state, metrics = ts.step(state, batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    return {"mode": mode, "params": count_params(ts.base or state["params"]),
            "trained": count_params(state["params"]), "first_step_s": times[0],
            "step_s": float(np.median(times[1:])),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)  # one measurement (child)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.rank)))
        return
    results = {}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--rank",
                              str(args.rank)], check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:5s} {r['params'] / 1e6:.1f}M params, {r['trained'] / 1e6:.2f}M trained: step {r['step_s']:.3f} s "
              f"(first {r['first_step_s']:.1f} s), peak RSS {r['peak_rss_gib']:.2f} GiB")
    full, lora = results["full"], results["lora"]
    print(f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, peak RSS "
          f"{lora['peak_rss_gib'] / full['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    main()
