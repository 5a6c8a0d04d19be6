"""`molmo2-jax plan`: compiles the real training step of Molmo2-4B with a reduced layer count on 8 simulated
devices and prints XLA's figures next to the analytic estimate; bad meshes and workloads fail before any
compilation; the analytic connector term from shapes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
REDUCED = ["text.num_layers=2", "vision.num_layers=2", "adapter.vit_layers=[1,0]"]


def cpu_env() -> dict[str, str]:
    """The environment of a subprocess on the CPU with this checkout first on its path (the caller's PYTHONPATH
    kept: where libtpu is installed for --target)."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _plan(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molmo2_jax.cli", "plan", *args], capture_output=True, text=True,
                          env=cpu_env(), timeout=timeout)


def _row(report: str, name: str) -> tuple[float, float]:
    match = re.search(rf"^  {name}\s+([\d.]+)\s+([\d.]+)", report, re.M)
    assert match, f"no {name} row in:\n{report}"
    return float(match.group(1)), float(match.group(2))


@pytest.mark.slow
def test_plan_reduced_4b_agrees_with_the_estimate():
    proc = _plan("--model", "molmo2-4b", "--mesh", "fsdp=4,tensor=2", "--batch", "8", "--seq", "1024",
                 "--crops", "2", "--tokens", "392", *REDUCED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh data=1 fsdp=4 sequence=1 tensor=2 (8 devices, cpu)" in out
    assert re.search(r"compile [\d.]+ s", out)
    # arguments and outputs are exact bookkeeping: sharded params + optimizer state (+ batch)
    xla, analytic = _row(out, "arguments")
    assert xla == pytest.approx(analytic, rel=0.02)
    xla, analytic = _row(out, "outputs")
    assert xla == pytest.approx(analytic, rel=0.02)
    xla, analytic = _row(out, "peak")
    assert 0.5 <= xla / analytic <= 2.0, out
    # 2 layers of the 4B model: the embedding and lm_head dominate; split 8 ways, fp32 params ~ 0.5 GiB each
    params = float(re.search(r"params ([\d.]+) \+ optimizer state ([\d.]+)", out).group(1))
    assert params == pytest.approx(1_068_712_864 * 4 / 8 / 2**30, rel=0.02)
    assert re.search(r"FLOPs per step: analytic [\d.e+]+ total", out)


@pytest.mark.parametrize("mesh,devices,message", [
    ("fsdp=8,tensor=2", "8", "mesh {'fsdp': 8, 'tensor': 2} has 16 devices but 8 are available"),
    ("tensor=16", None, "text.num_kv_heads = 8 is not divisible by the tensor axis of the mesh (tensor=16)"),
    ("data=3", None, "--batch 8 is not divisible by data x fsdp = 3"),
    ("fsdp=3", None, "param(s) cannot be split evenly on mesh data=1 fsdp=3"),
    ("fsdp=8,model=2", None, "'model=2' is not AXIS=SIZE"),
    ("fsdp=8 --slices 2", None, "--slices is for --target (slices of a TPU topology)"),
])
def test_bad_mesh_fails_before_compiling(mesh, devices, message):
    mesh, *more = mesh.split()
    proc = _plan("--model", "molmo2-4b", "--mesh", mesh, *more, *(["--devices", devices] if devices else []),
                 "--batch", "8", "--seq", "1024", *REDUCED, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("molmo2-jax plan: error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing was lowered or compiled


@pytest.mark.parametrize("flag,value,least", [("--pool", "0", 1), ("--tokens", "-5", 0), ("--batch", "0", 1)])
def test_bad_workload_fails_before_compiling(flag, value, least):
    args = {"--batch": "8", "--seq": "1024", "--crops": "2", "--tokens": "392", "--pool": "4", flag: value}
    proc = _plan("--model", "molmo2-4b", "--mesh", "fsdp=8", *[x for kv in args.items() for x in kv], *REDUCED,
                 timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"molmo2-jax plan: error: {flag} must be >= {least}, got {value}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_plan_counts_the_connector_by_what_it_keeps():
    """`plan`'s analytic connector term, from abstract shapes (nothing compiles): with `vit_chunk` it keeps the
    crops' features (fp32 copy and gradient accumulator) and recomputes each chunk of pooled tokens, so it grows
    with the crops, not the token count; in one call it keeps the windows too, which grow with the tokens. The
    ViT's features are not counted again among the saved activations."""
    import jax

    from molmo2_jax.config import load_preset
    from molmo2_jax.plan import Workload, abstract_batch, estimate
    from molmo2_jax.sharding import make_mesh
    from molmo2_jax.training.config import TrainConfig
    from molmo2_jax.training.step import make_train_step

    mesh = make_mesh({}, jax.devices()[:1])

    def connector(chunk: int | None, crops: int, tokens: int):
        config = load_preset("tiny", ["dtype=bfloat16", "remat_policy=full"]).replace(vit_chunk=chunk)
        state = make_train_step(config, TrainConfig(), mesh).abstract_state()
        work = Workload(2, 4096, crops, tokens, 9)
        e = estimate(config, mesh, work, {"params": state["params"], "opt_state": state["opt_state"],
                                          "batch": abstract_batch(config, work)})
        return e.connector, e.saved_activations

    # tiny: 729 patches per crop, 81 tokens of 9; vit_chunk=2: 2 crops' tokens (162) per device and chunk
    (chunked, saved), (more_tokens, _) = connector(2, 16, 648), connector(2, 16, 1296)
    assert chunked == more_tokens  # chunks are recomputed, not kept
    more_crops, more_saved = connector(2, 32, 648)
    assert more_crops == 2 * chunked  # the features of twice the crops
    assert more_saved == saved  # the ViT's features are counted once, in the connector term
    (one_call, _), (one_call_more, _) = connector(None, 16, 648), connector(None, 16, 1296)
    assert one_call > chunked and one_call_more - one_call == one_call - chunked  # windows kept, per token
