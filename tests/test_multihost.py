"""Two processes joined by `jax.distributed` (4 simulated CPU devices each, gloo collectives, loopback
coordinator) run a sharded forward pass, a training step (the real TrainStep) and an Orbax save + restore;
the results equal the single-process run in the pytest process.

This file executed as a script is one of the two workers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
OVERRIDES = ["vision.image_size=56"]
BATCH = 8


def _inputs(config):
    from test_sharding import _batch

    return _batch(config, batch=BATCH)


def _train_config():
    from molmo2_jax.training.config import TrainConfig

    return TrainConfig(steps=10)


def _worker(process_id: int, port: int, out_dir: str) -> None:
    import jax

    from molmo2_jax import distributed

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_default_matmul_precision", "highest")
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id)

    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from molmo2_jax.config import load_preset
    from molmo2_jax.params import flatten
    from molmo2_jax.sharding import make_mesh
    from molmo2_jax.training.step import MODEL_KEYS, make_train_step

    config = load_preset("tiny", OVERRIDES)
    mesh = make_mesh(MESH)
    for line in distributed.startup_lines(mesh):
        print(line, flush=True)
    full = _inputs(config)
    rows = distributed.host_rows(mesh, BATCH)
    crops_per_example = full["pixel_values"].shape[0] // BATCH
    tokens_per_example = full["image_token_pooling"].shape[0] // BATCH
    per = {"pixel_values": crops_per_example, "image_token_pooling": tokens_per_example}
    local = {k: v[rows.start * per.get(k, 1): rows.stop * per.get(k, 1)] for k, v in full.items()}
    batch = distributed.global_batch(mesh, local, BATCH)

    ts = make_train_step(config, _train_config(), mesh)
    state = ts.init_state(0)
    with ts.context():
        forward = jax.jit(lambda p, b: ts.module.apply({"params": p}, **{k: b[k] for k in MODEL_KEYS if k in b})[0])
        logits = forward(state["params"], batch)
        micro = {k: v[None] for k, v in batch.items()}  # one micro-batch
        micro = jax.jit(lambda b: b, out_shardings=ts.batch_shardings(micro))(micro)
        state, metrics = ts.jit_step(micro)(state, micro)

    ckpt = Path(out_dir) / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(ckpt, state["params"])
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(ckpt, ts.abstract_state()["params"])
    gathered = {f"param:{p}": multihost_utils.process_allgather(x, tiled=True)
                for p, x in flatten(state["params"]).items()}
    same = all(np.array_equal(multihost_utils.process_allgather(x, tiled=True), gathered[f"param:{p}"])
               for p, x in flatten(restored).items())
    logits = multihost_utils.process_allgather(logits, tiled=True)
    if process_id == 0:
        np.savez(Path(out_dir) / "result.npz", logits=logits, loss=float(metrics["loss"]), restored_equal=same,
                 **gathered)
    print(f"process {process_id} done", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    import jax

    from molmo2_jax.config import load_preset
    from molmo2_jax.params import flatten
    from molmo2_jax.sharding import make_mesh
    from molmo2_jax.training.step import MODEL_KEYS, make_train_step

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)]))
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert "process 1/2: 4 local of 8 devices (cpu)" in outputs[1]
    assert "mesh data=2 fsdp=2 sequence=1 tensor=2 (8 devices, cpu)" in outputs[0]
    got = np.load(tmp_path / "result.npz")
    assert bool(got["restored_equal"])

    # the same computation in this (single-device) process
    config = load_preset("tiny", OVERRIDES)
    ts = make_train_step(config, _train_config(), make_mesh({"fsdp": 1}, jax.devices()[:1]))
    state = ts.init_state(0)
    batch = _inputs(config)
    logits = ts.module.apply({"params": state["params"]}, **{k: batch[k] for k in MODEL_KEYS if k in batch})[0]
    state, metrics = ts.step(state, {k: v[None] for k, v in batch.items()})
    assert np.max(np.abs(got["logits"] - np.asarray(logits))) <= 1e-5
    assert abs(float(got["loss"]) - float(metrics["loss"])) <= 1e-5
    for path, value in flatten(state["params"]).items():
        assert np.max(np.abs(got[f"param:{path}"] - np.asarray(value))) <= 1e-6, path


def test_incomplete_settings_fail_fast(monkeypatch):
    from molmo2_jax.distributed import DistributedError, initialize

    for name in ("MOLMO2_COORDINATOR", "MOLMO2_NUM_PROCESSES", "MOLMO2_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match=r"missing process_id \(--process-id or MOLMO2_PROCESS_ID\)"):
        initialize("127.0.0.1:1234", 2)
    monkeypatch.setenv("MOLMO2_NUM_PROCESSES", "two")
    with pytest.raises(DistributedError, match="num_processes 'two'"):
        initialize("127.0.0.1:1234", process_id=0)
    with pytest.raises(DistributedError, match="process_id 3 is not in 0..1"):
        initialize("127.0.0.1:1234", 2, 3)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
