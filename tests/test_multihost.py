"""Two processes joined by `jax.distributed` (4 simulated CPU devices each, gloo collectives, loopback
coordinator) train with the real loop, each feeding only its own examples: the logits of a global batch, the
losses of every step and the params saved at the end equal those of one process training on the merged batches,
for full fine-tuning and for LoRA (adapters on the LLM, ViT and connector over a frozen base).
SIGTERM on one process stops both after the same step, with its checkpoint (state and both data iterators) saved.
Batches that differ between the hosts in their keys, a mesh whose batch axes do not span the hosts and a batch
array of unsupported rank fail on both hosts with one message.

This file executed as a script is one of the two workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax_setup import configure

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
OVERRIDES = ["vision.image_size=56"]
ROWS = 2  # examples per host and micro-batch (one crop each)
STEPS, STOP_AT = 4, 3  # process 1 gets SIGTERM while drawing the batches of step STOP_AT


LORA = {"rank": 4, "lr": 1e-3, "warmup_steps": 0, "targets": r"decoder/.*/kernel|vision/.*/kernel|connector/.*/kernel"}


def _train_config(run_dir, mode: str):
    from molmo2_jax.training.config import parse_train_config

    return parse_train_config({
        "run_dir": str(run_dir), "model": {"preset": "tiny"}, "steps": STEPS, "grad_accum": 2,
        "optimizer": {g: {"warmup_steps": 0, "lr": 1e-3} for g in ("connector", "vit", "llm")},
        "checkpoint": {"every": 100}, "log": {"every": 1, "tensorboard": False},
        **({"lora": LORA} if mode == "lora" else {})})


def _start(config, train_config, mesh):
    """The train step and its fresh state (LoRA: a random frozen base from seed 0, B = 0 adapters)."""
    from molmo2_jax.training.step import make_train_step

    ts = make_train_step(config, train_config, mesh)
    if ts.lora:
        ts.set_base(0)
    return ts, ts.init_state(0)


def _logits(ts, params, batch):
    """The model's logits for one micro-batch (LoRA: the adapters applied to the frozen base)."""
    import contextlib

    from molmo2_jax import lora
    from molmo2_jax.training.step import MODEL_KEYS

    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    with lora.applied(ts.lora) if ts.lora else contextlib.nullcontext():
        return ts.module.apply({"params": lora.combine(ts.base, params) if ts.lora else params}, **inputs)[0]


def _examples(config, index: int, host: int) -> dict[str, np.ndarray]:
    """Host `host`'s examples of micro-batch `index`, pooling indices into its own crops."""
    from batches import training_batch

    return training_batch(config, batch=ROWS, seed=10 * index + host)


def _host_micro_batch(config, index: int, host: int) -> dict[str, np.ndarray]:
    """What host `host` loads as micro-batch `index`. Host 1 packs its first micro-batch of step 2 into a bigger
    bucket (a padding crop and padding pooled tokens), so the hosts' shapes differ."""
    from molmo2_jax.training.loop import pad_to

    batch = _examples(config, index, host)
    if host == 1 and index == 2:
        grow = {"pixel_values": 1, "image_token_pooling": 3}
        batch = {k: pad_to(k, v, (len(v), v.shape[1] + grow.get(k, 0), *v.shape[2:])) for k, v in batch.items()}
    return batch


def _merged_micro_batch(config, index: int) -> dict[str, np.ndarray]:
    """Micro-batch `index` as one process sees it: both hosts' examples (pooling indices are per row)."""
    parts = [_examples(config, index, host) for host in (0, 1)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _worker(process_id: int, port: int, out_dir: str, mode: str) -> None:
    import jax

    from molmo2_jax import distributed

    configure(devices=4)
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id)

    import grain
    from jax.experimental import multihost_utils

    from molmo2_jax.config import load_preset
    from molmo2_jax.params import flatten
    from molmo2_jax.sharding import make_mesh
    from molmo2_jax.training.checkpointing import Checkpointer
    from molmo2_jax.training.loop import Trainer, TrainingInterrupted, stack_micro_batches

    config = load_preset("tiny", OVERRIDES)
    mesh = make_mesh(MESH)
    for line in distributed.startup_lines(mesh):
        print(line, flush=True)
    train_config = _train_config(Path(out_dir) / "run", mode)
    ts, state = _start(config, train_config, mesh)
    result = {}

    # the logits of (the first micro-batch of) a global batch assembled from each host's own examples
    batch = ts.place_batch(stack_micro_batches([_host_micro_batch(config, i, process_id) for i in (0, 1)]))
    with ts.context():
        forward = jax.jit(lambda p, b: _logits(ts, p, {k: v[0] for k, v in b.items()}))
        logits = multihost_utils.process_allgather(forward(state["params"], batch), tiled=True)

    # training with the real loop on this host's data; SIGTERM reaches process 1 only
    def host_data():
        return iter(grain.MapDataset.range(2 * STEPS).map(lambda i: _host_micro_batch(config, i, process_id))
                    .to_iter_dataset())

    data = host_data()

    def signalled(iterator):
        for i, micro_batch in enumerate(iterator):
            if process_id == 1 and i == 2 * (STOP_AT - 1):
                os.kill(os.getpid(), signal.SIGTERM)
            yield micro_batch

    checkpointer = Checkpointer(Path(train_config.run_dir) / "checkpoints", train_config.checkpoint)
    trainer = Trainer(ts, checkpointer, log=lambda line: print(line, flush=True))
    try:
        trainer.run(state, signalled(data), data)
        raise AssertionError("training was not interrupted")
    except TrainingInterrupted as e:
        result["stopped"] = [e.signum, e.step, str(e.checkpoint)]
    result["losses"] = [[step, m["loss"]] for step, m in trainer.history]

    # the saved step restores (state and this host's data position)
    fresh = host_data()
    restored = checkpointer.restore(checkpointer.latest_step(), ts.abstract_state(), config, fresh)
    checkpointer.close()
    result["next_micro_batch_is_step_4"] = bool(np.array_equal(next(fresh)["input_ids"],
                                                               _host_micro_batch(config, 6, process_id)["input_ids"]))
    params = {p: multihost_utils.process_allgather(x, tiled=True) for p, x in flatten(restored["params"]).items()}

    # hosts whose pipelines disagree, a mesh whose batch axes do not span the hosts and a rank-6 array fail on
    # every host
    mine = _host_micro_batch(config, 0, process_id)
    if process_id == 1:
        mine["extra"] = mine["input_ids"]
    result["errors"] = []
    for bad_mesh, local in ((mesh, mine), (make_mesh({"tensor": 8}), mine),
                            (mesh, {"input_ids": np.zeros((1,) * 6, np.int32)})):
        try:
            distributed.agree(bad_mesh, sorted({*mine, "extra"}), local)
        except ValueError as e:
            result["errors"].append(str(e))
    if process_id == 0:
        np.savez(Path(out_dir) / "arrays.npz", logits=logits, **{f"param:{p}": v for p, v in params.items()})
    (Path(out_dir) / f"result{process_id}.json").write_text(json.dumps(result))
    # meet before exiting: a host far behind the other (a loaded machine) would time out jax's shutdown barrier
    multihost_utils.sync_global_devices("worker done")
    print(f"process {process_id} done", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_processes_match_single_process(tmp_path, mode):
    import jax

    from molmo2_jax.config import load_preset
    from molmo2_jax.params import flatten
    from molmo2_jax.sharding import make_mesh
    from molmo2_jax.training.loop import stack_micro_batches

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)]))
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert "process 1/2: 4 local of 8 devices (cpu)" in outputs[1]
    assert "mesh data=2 fsdp=2 sequence=1 tensor=2 (8 devices, cpu)" in outputs[0]
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    arrays = np.load(tmp_path / "arrays.npz")

    # both processes stopped after the step in which process 1 got the signal, and saved it with both data states
    saved = tmp_path / "run" / "checkpoints" / str(STOP_AT)
    assert results[0]["stopped"] == results[1]["stopped"] == [signal.SIGTERM, STOP_AT, str(saved)]
    assert "SIGTERM received: saving step 3, then stopping" in outputs[0]
    assert sorted(p.name for p in (saved / "data").glob("process_*.json")) == ["process_0-of-2.json",
                                                                              "process_1-of-2.json"]
    assert results[0]["next_micro_batch_is_step_4"] and results[1]["next_micro_batch_is_step_4"]
    for errors in (results[0]["errors"], results[1]["errors"]):
        assert len(errors) == 3, errors
        assert "the processes' batches differ in their keys or ranks (['extra'])" in errors[0]
        assert "the batch axes (data x fsdp = 1) do not split over 2 processes" in errors[1]
        assert "batch['input_ids'] has rank 6; at most 5 is supported" in errors[2]

    # the same training in this (single-device) process on the merged batches
    config = load_preset("tiny", OVERRIDES)
    ts, state = _start(config, _train_config(tmp_path / "single", mode), make_mesh({"fsdp": 1}, jax.devices()[:1]))
    logits = _logits(ts, state["params"], _merged_micro_batch(config, 0))
    assert np.max(np.abs(arrays["logits"] - np.asarray(logits))) <= 1e-5 * np.max(np.abs(logits))
    expected = []
    for step in range(STOP_AT):
        batch = stack_micro_batches([_merged_micro_batch(config, 2 * step + a) for a in range(2)])
        state, metrics = ts.step(state, batch)
        expected.append([step + 1, float(metrics["loss"])])
    for got in (results[0]["losses"], results[1]["losses"]):
        assert [s for s, _ in got] == [s for s, _ in expected]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-5)
    # Adam divides by the gradients' scale, so rounding moves entries whose gradients are ~0 by up to ~1e-5 per
    # step; a wrong batch moves them by ~lr = 1e-3
    for path, value in flatten(state["params"]).items():
        assert np.max(np.abs(arrays[f"param:{path}"] - np.asarray(value))) <= 1e-4, path


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
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
