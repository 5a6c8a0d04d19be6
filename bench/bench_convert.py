"""Conversion memory and throughput on a synthetic multi-GB checkpoint: ours vs the transformers reference.

    python bench/bench_convert.py [--workdir DIR] [--layers 16] [--hidden 2048] [--keep]

Builds a released-layout HF checkpoint with numpy + safetensors (no torch), then runs, each in its own
subprocess sampling /proc/self/status every 10 ms:
  ours-import   molmo2-jax convert (HF -> our Orbax format)
  ours-export   molmo2-jax export (our format -> HF shards)
  reference     transformers from_pretrained + save_pretrained (the PyTorch world's load-and-save)
and prints peak anonymous RSS (heap: what must fit in RAM), peak file-backed RSS (pages of memory-mapped files,
which the kernel can write back and drop), the kernel's peak RSS (VmHWM, anonymous + file-backed, no sampling
gaps; ru_maxrss is not used as it inherits the parent's peak across exec), seconds and MB/s, the largest single
tensor, and ours/reference ratios. Finally checks that `molmo2_jax.load` of the converted checkpoint holds
exactly the source values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# -- the synthetic checkpoint ---------------------------------------------------------------------------

def synthetic_config(layers: int, hidden: int):
    from molmo2_jax.config import AdapterConfig, Molmo2Config, TextConfig, TokenIds, VisionConfig

    vocab = 32000
    text = TextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers, num_heads=hidden // 128,
                      num_kv_heads=hidden // 256, head_dim=128, vocab_size=vocab, additional_vocab_size=128,
                      max_position_embeddings=4096)
    vision = VisionConfig(num_layers=3)
    adapter = AdapterConfig(vit_layers=(2, 1), intermediate_size=2 * hidden, text_hidden_size=hidden)
    tokens = TokenIds(*range(vocab, vocab + 10), bos=1, eos=(2,), pad=0)
    return Molmo2Config(vision=vision, adapter=adapter, text=text, tokens=tokens).validate()


def write_synthetic(path: Path, config, shard_bytes: int = 1 << 30) -> int:
    """Random released-layout tensors in ~1 GB shards; returns the total bytes."""
    from safetensors.numpy import save_file

    from molmo2_jax.checkpoint.export import INDEX_FILE
    from molmo2_jax.checkpoint.hf import export_tensors
    from molmo2_jax.config import to_hf_config
    from molmo2_jax.params import param_shapes

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = param_shapes(config)
    # Tensors come from the export table applied to random params (one param in memory at a time).
    get = lambda p: rng.standard_normal(shapes[p], dtype=np.float32) * 0.02
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, array in export_tensors(get, config):
        shard[name] = array
        size += array.nbytes
        total += array.nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(to_hf_config(config)))
    return total


# -- measured child processes --------------------------------------------------------------------------

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(job: str, src: str, dst: str) -> None:
    """Run one job with a memory sampler; print a JSON line of measurements."""
    if job == "reference":
        import torch
        from transformers import Molmo2ForConditionalGeneration
    else:
        import molmo2_jax.checkpoint.convert  # noqa: F401  (imports out of the measured window)
        import molmo2_jax.checkpoint.export  # noqa: F401
    base = _status()
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for key, value in _status().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if job == "ours-import":
        from molmo2_jax.checkpoint.convert import convert_hf_to_jax

        convert_hf_to_jax(src, dst, log=None)
    elif job == "ours-export":
        from molmo2_jax.checkpoint.export import export_to_hf

        export_to_hf(src, dst, log=None)
    else:
        model = Molmo2ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
        model.save_pretrained(dst)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "base_anon": base["RssAnon"], "peak_anon": peak["RssAnon"],
                      "peak_file": peak["RssFile"], "vm_hwm": _status()["VmHWM"]}))


def measure(job: str, src: Path, dst: Path) -> dict[str, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, "--child", job, str(src), str(dst)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_restore(src: Path, converted_dir: Path) -> int:
    """Compare `molmo2_jax.load(converted)` with the source tensors param by param; returns the param count."""
    import molmo2_jax
    from molmo2_jax.checkpoint import hf
    from molmo2_jax.params import flatten, param_shapes

    restored = flatten(molmo2_jax.load(converted_dir).params)
    config = hf.read_config(src)

    def same(path, value):
        if not np.array_equal(np.asarray(restored[path]), value):
            raise AssertionError(f"{path}: restored values differ from the source")

    hf.import_params(src, config, param_shapes(config), place=same)
    return len(restored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--child", nargs=3, metavar=("JOB", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        config = synthetic_config(args.layers, args.hidden)
        total = write_synthetic(work / "hf", config)
        largest = max(np.prod(s) for s in _tensor_shapes(config)) * 4
        print(f"synthetic checkpoint: {total / 1e9:.2f} GB float32, text {args.layers} layers x {args.hidden}, "
              f"vocab {config.text.vocab_size}; largest tensor {largest / 1e6:.0f} MB")
        results = {
            "ours-import": measure("ours-import", work / "hf", work / "jax"),
            "ours-export": measure("ours-export", work / "jax", work / "hf_back"),
            "reference": measure("reference", work / "hf", work / "hf_ref"),
        }
        print(f"{'job':<12} {'seconds':>8} {'MB/s':>7} {'peak anon MB':>13} {'(base)':>7} {'peak file MB':>13} "
              f"{'VmHWM MB':>10}")
        for job, r in results.items():
            print(f"{job:<12} {r['seconds']:>8.1f} {total / 1e6 / r['seconds']:>7.0f} {r['peak_anon'] / 1e6:>13.0f} "
                  f"{r['base_anon'] / 1e6:>7.0f} {r['peak_file'] / 1e6:>13.0f} {r['vm_hwm'] / 1e6:>10.0f}")
        ref = results["reference"]
        for job in ("ours-import", "ours-export"):
            r = results[job]
            print(f"{job} / reference: time {r['seconds'] / ref['seconds']:.2f}x, "
                  f"peak anon {r['peak_anon'] / ref['peak_anon']:.2f}x, "
                  f"VmHWM {r['vm_hwm'] / ref['vm_hwm']:.2f}x;"
                  f" anon above base = {(r['peak_anon'] - r['base_anon']) / largest:.1f} x largest tensor")
        count = check_restore(work / "hf", work / "jax")
        print(f"molmo2_jax.load restores all {count} params of the converted checkpoint with identical values")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _tensor_shapes(config):
    from molmo2_jax.params import param_shapes

    shapes = param_shapes(config)
    return [s[1:] if p.startswith(("decoder/layers/", "vision/blocks/")) else s for p, s in shapes.items()]


if __name__ == "__main__":
    main()
