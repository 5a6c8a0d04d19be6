"""Training: kill-and-resume gives bit-identical losses, SIGTERM saves the step and resuming continues
identically, gradient accumulation equals one large batch, frozen params stay put, and bad configs / checkpoints /
NaN losses fail with one clear message.

This file executed as a script is `molmo2-jax train` training on the synthetic batches below (for the SIGTERM test).
"""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from batches import collate, example, synthetic_batches
from jax_setup import configure

from molmo2_jax.config import load_preset
from molmo2_jax.params import flatten
from molmo2_jax.training.checkpointing import Checkpointer, ResumeError
from molmo2_jax.training.config import TrainConfigError, load_train_config, parse_train_config
from molmo2_jax.training.loop import NanLossError, Trainer, _batch_counts, initial_state, stack_micro_batches
from molmo2_jax.training.step import BatchError, make_train_step

MODEL = load_preset("tiny")


def train_config(tmp_path, **changes):
    base = {"run_dir": str(tmp_path), "model": {"preset": "tiny"}, "steps": 4,
            "optimizer": {g: {"warmup_steps": 0, "lr": 1e-3} for g in ("connector", "vit", "llm")},
            "checkpoint": {"every": 2, "keep": 5}, "log": {"every": 1, "tensorboard": False}}
    for key, value in changes.items():
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_train_config(base)


@pytest.fixture(scope="module")
def train_step(tmp_path_factory):
    return make_train_step(MODEL, train_config(tmp_path_factory.mktemp("cfg")))


class Kill(Exception):
    pass


def killed_after(iterator, n):
    for i, batch in enumerate(iterator):
        if i == n:
            raise Kill
        yield batch


def test_kill_and_resume_gives_identical_losses(train_step, tmp_path):
    logs = []
    # uninterrupted run
    full = Trainer(train_step, Checkpointer(tmp_path / "full", train_step.train_config.checkpoint), log=logs.append)
    data = synthetic_batches(2)
    full.run(train_step.init_state(0), data, data)
    expected = dict(full.history)

    # the same run killed while drawing the batch of step 4 (after the checkpoint of step 2) ...
    ckpt = Checkpointer(tmp_path / "killed", train_step.train_config.checkpoint)
    killed = Trainer(train_step, ckpt, log=logs.append)
    data = synthetic_batches(2)
    with pytest.raises(Kill):
        killed.run(train_step.init_state(0), killed_after(data, 3), data)
    ckpt.wait()
    # ... and resumed by a fresh process: new checkpointer, new data iterator, state from the latest step
    ckpt = Checkpointer(tmp_path / "killed", train_step.train_config.checkpoint)
    data = synthetic_batches(2)
    state = initial_state(train_step, ckpt, lambda: pytest.fail("should resume"), data, log=logs.append)
    assert int(state["step"]) == 2
    resumed = Trainer(train_step, ckpt, log=logs.append)
    resumed.run(state, data, data)
    assert [s for s, _ in resumed.history] == [3, 4]
    for step, metrics in resumed.history:
        assert metrics["loss"] == expected[step]["loss"], f"step {step}"  # bit-identical
        assert metrics["grad_norm"] == expected[step]["grad_norm"]
    assert any(line.startswith("step 4/4 | loss") and "tok/s" in line and "data wait" in line for line in logs)


def test_nan_loss_stops_with_step_and_last_checkpoint(train_step, tmp_path):
    def poisoned():
        data = synthetic_batches(2)
        for i, batch in enumerate(data):
            if i == 2:
                batch = dict(batch, loss_weights=batch["loss_weights"] * np.nan)
            yield batch

    ckpt = Checkpointer(tmp_path, train_step.train_config.checkpoint)
    with pytest.raises(NanLossError, match=rf"at step 3; stopping. Last checkpoint: {tmp_path}/2"):
        Trainer(train_step, ckpt, log=lambda _: None).run(train_step.init_state(0), poisoned())
    ckpt.wait()
    assert ckpt.manager.all_steps() == [2]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """One optimizer step over 4 examples: as 4 micro-batches of 1, and as one batch of 4."""
    tmp = tmp_path_factory.mktemp("accum")
    examples = [example(10 + i, i % 2 == 0) for i in range(4)]
    freeze = "vision/(pos_embed|patch_embed/.*)"
    results = {}
    for accum, batch in ((4, stack_micro_batches([collate([e]) for e in examples])),
                         (1, stack_micro_batches([collate(examples)]))):
        ts = make_train_step(MODEL, train_config(tmp, grad_accum=accum, **{"optimizer.freeze": freeze}))
        state = ts.init_state(0)
        before = jax.device_get(flatten(state["params"]))
        state, metrics = ts.step(state, batch)
        results[accum] = before, jax.device_get(flatten(state["params"])), jax.device_get(metrics)
    return results


def test_gradient_accumulation_equals_one_large_batch(accumulated):
    _, params4, m4 = accumulated[4]
    _, params1, m1 = accumulated[1]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m4["loss_weight"] == m1["loss_weight"]
    # Adam's first update is ~lr * sign(grad): grads that are ~0 in both runs may round to different signs, so
    # params are compared to 1% of the learning rate (a wrong accumulation moves them by ~2 * lr).
    for path in params1:
        np.testing.assert_allclose(params4[path], params1[path], rtol=0, atol=1e-5, err_msg=path)


def test_frozen_params_do_not_change(accumulated):
    before, after, _ = accumulated[4]
    frozen = ["vision/pos_embed", "vision/patch_embed/kernel", "vision/patch_embed/bias"]
    for path in frozen:
        assert np.array_equal(before[path], after[path]), path
    moved = [p for p in before if p not in frozen and not np.array_equal(before[p], after[p])]
    assert "vision/blocks/q/kernel" in moved and "connector/q/kernel" in moved and "lm_head" in moved


# -- bad input: clear errors before anything compiles ------------------------------------------------------


def test_unknown_config_key_lists_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny}\noptimizer:\n  lr_connector: 1.0\n")
    with pytest.raises(TrainConfigError, match=r"unknown config key\(s\) \['lr_connector'\] in optimizer\.; "
                                               r"valid keys: \[.*'connector'.*'freeze'"):
        load_train_config(path)
    with pytest.raises(TrainConfigError, match=r"unknown config key\(s\) \['stepz'\].*valid keys: \[.*'steps'"):
        load_train_config(path, ["optimizer={}", "stepz=3"])


SOURCES = "processor_dir: tok, sources: [{path: ds}]"


@pytest.mark.parametrize("section, message", [
    ("data: {processor_dir: tok, sources: [{path: ds, splt: train}]}",
     r"unknown config key\(s\) \['splt'\] in data\.sources\[0\]\.; valid keys: \[.*'split'"),
    (f"data: {{{SOURCES}, buckets: [{{seq_len: 64, max_crop: 2}}]}}",
     r"unknown config key\(s\) \['max_crop'\] in data\.buckets\[0\]\.; valid keys: \[.*'max_crops'"),
    (f"eval_data: {{{SOURCES}, batchsize: 2}}", r"\['batchsize'\] in eval_data\.; valid keys: \[.*'batch_size'"),
    ("data: {sources: [{path: ds}]}", r"missing config key\(s\) \['processor_dir'\] in data\."),
    ("model: {preset: tiny, text: {num_layer: 2}}", r"\['num_layer'\] in model\.text\.; valid keys: .*'num_layers'"),
    ("model: {preset: tiny, text: {num_layers: two}}", r"model\.text\.num_layers: expected int, got 'two'"),
    ("mesh: {fsdpp: 2}", r"\['fsdpp'\] in mesh\.; valid keys: \['data', 'fsdp', 'sequence', 'tensor'\]"),
    ("mesh: {data: -1}", r"mesh \{.*\}: sizes must be positive, and at most one -1"),
    ("lora: {rank: 4, targett: x}", r"\['targett'\] in lora\."),
])
def test_unknown_key_in_any_section_fails_at_load(tmp_path, section, message):
    """Every section is typed: a wrong key at any depth fails while the YAML is read, in one line."""
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{preset: tiny}}\n{section}\n")
    with pytest.raises(TrainConfigError, match=message) as error:
        load_train_config(path)
    assert "\n" not in str(error.value)


def test_lr_group_matching_no_params_is_an_error(tmp_path):
    config = train_config(tmp_path, **{"optimizer.vit.pattern": "vit/.*"})
    with pytest.raises(TrainConfigError, match=r"optimizer.vit.pattern 'vit/.\*' matches no parameter"):
        make_train_step(MODEL, config)
    config = train_config(tmp_path, **{"optimizer.freeze": "nothing/.*"})
    with pytest.raises(TrainConfigError, match="optimizer.freeze 'nothing/.\\*' matches no parameter"):
        make_train_step(MODEL, config)


def test_resume_from_another_model_shape_is_an_error(tmp_path):
    config = train_config(tmp_path)
    ckpt = Checkpointer(tmp_path, config.checkpoint)
    ckpt.save(5, {"step": np.zeros((), np.int32)}, MODEL, config)
    ckpt.wait()
    other = MODEL.replace(text=MODEL.text.__class__(**{**MODEL.text.__dict__, "num_layers": 3}))
    with pytest.raises(ResumeError, match=rf"{tmp_path}/5: checkpoint is of another model shape .*decoder/layers"):
        ckpt.restore(5, {}, other)


def test_mixed_precision_keeps_fp32_master_weights(tmp_path):
    ts = make_train_step(MODEL.replace(dtype="bfloat16"), train_config(tmp_path))
    state = ts.init_state(0)
    batch = stack_micro_batches([next(synthetic_batches(2))])
    state, metrics = ts.step(state, batch)
    assert {x.dtype for x in jax.tree_util.tree_leaves(state["params"])} == {np.dtype("float32")}
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    with pytest.raises(TrainConfigError, match="model.param_dtype is 'bfloat16'; training keeps fp32 master"):
        make_train_step(MODEL.replace(param_dtype="bfloat16"), train_config(tmp_path))


def test_release_configs_parse_and_resolve_their_presets():
    from molmo2_jax.config import packaged_configs
    from molmo2_jax.training.config import model_config

    names = packaged_configs("train")
    for model in ("4b", "8b", "o-7b"):
        assert {f"molmo2-{model}-{stage}" for stage in ("pretrain", "sft", "long-sft")} <= set(names)
    for name in names:
        config = load_train_config(name)
        if config.model.preset and not config.model.vocab_from:
            assert model_config(config).param_dtype == "float32"
    sft = load_train_config("molmo2-4b-sft")
    assert (sft.optimizer.connector.lr, sft.optimizer.vit.lr, sft.optimizer.llm.lr) == (5e-6, 5e-6, 1e-5)
    pre = load_train_config("molmo2-4b-pretrain")
    assert [g.warmup_steps for g in pre.optimizer.groups.values()] == [200, 2000, 2000]


def test_train_command_reports_bad_config_in_one_line(capsys):
    from molmo2_jax.cli import main

    assert main(["train", "--config", "tiny", "optimizer.connector.lrr=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("molmo2-jax train: error: unknown config key(s) ['lrr'] in "
                                               "optimizer.connector.")
    assert main(["train", "--config", "no-such-config"]) == 1
    assert "training config 'no-such-config' not found" in capsys.readouterr().err


def event_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    """`{(tag, step): value}` of every TensorBoard event file in `logdir`."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        while data:  # TFRecord framing: length, its CRC, the record, its CRC
            (n,) = struct.unpack("<Q", data[:8])
            event = Event.FromString(data[12:12 + n])
            scalars.update({(v.tag, event.step): v.simple_value for v in event.summary.value})
            data = data[16 + n:]
    return scalars


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from molmo2_jax.training.metrics import EventWriter

    writer = EventWriter(tmp_path)
    writer.scalars(7, {"train/loss": 1.5, "train/skipped": float("nan")})
    writer.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert event_scalars(tmp_path) == {("train/loss", 7): 1.5}


def test_evaluation_gives_the_loss_the_step_reports(train_step):
    """Held-out evaluation on a batch gives the loss the train step reports for it (pre-update params)."""
    batch = next(synthetic_batches(2, seed=500))
    state = train_step.init_state(0)
    lines = []
    result = Trainer(train_step, log=lines.append).evaluate(0, state["params"], iter([batch]))
    _, metrics = train_step.step(state, stack_micro_batches([batch]))
    np.testing.assert_allclose(result["loss"], float(metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(result["accuracy"], float(metrics["accuracy"]), rtol=1e-6)
    assert lines == [f"eval step 0 | loss {result['loss']:.4f} | accuracy {result['accuracy']:.4f}"]


def test_step_compiles_ahead_of_time_from_abstract_shapes(train_step):
    """What the `plan` command needs: lower and compile the step from ShapeDtypeStructs, nothing allocated."""
    batch = stack_micro_batches([next(synthetic_batches(2))])
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    state_spec = train_step.abstract_state()
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
               for x in jax.tree_util.tree_leaves(state_spec))
    with train_step.context():
        compiled = train_step.jit_step(spec).lower(state_spec, spec, {}).compile()
    assert compiled.memory_analysis() is not None
    shardings = train_step.batch_shardings(spec)
    assert shardings["pixel_values"].spec[0] is None  # the micro-batch axis is never split


def test_batch_counts_of_a_bucket_without_frame_slots():
    """A bucket may hold no video (max_frames 0): its empty frame arrays count nothing (the main job's image-only
    bucket)."""
    batch = stack_micro_batches([next(synthetic_batches(2))])
    images = int(np.any(batch["image_token_pooling"] >= 0, axis=-1).sum())
    empty = dict(batch, pixel_values_videos=np.zeros((1, 2, 0, *batch["pixel_values"].shape[3:]), np.float32),
                 video_token_pooling=np.full((1, 2, 0, 9), -1, np.int32))
    assert _batch_counts(empty)[2] == images


def test_step_refuses_visual_arrays_in_the_transformers_layout(train_step):
    """The batch contract is per row: crops flattened over the batch (the processor's layout) are named, in one
    line, before anything is traced."""
    batch = stack_micro_batches([next(synthetic_batches(2))])
    flat = dict(batch, pixel_values=batch["pixel_values"].reshape(1, -1, *batch["pixel_values"].shape[3:]))
    with pytest.raises(BatchError, match=r"^training batch, micro-batch 0: pixel_values has shape .*; expected "
                                         r"\[batch=2, crops, patches, values\]$"):
        train_step.step(train_step.init_state(0), flat)


# -- SIGTERM / Ctrl-C: save the step, exit cleanly, resume identically ---------------------------------------

PREEMPT_SETTINGS = {"model": {"preset": "tiny"}, "steps": 6,
                    "optimizer": {g: {"warmup_steps": 0, "lr": 1e-3} for g in ("connector", "vit", "llm")},
                    "checkpoint": {"every": 100, "keep": 5}, "log": {"every": 1, "tensorboard": True}}


def _train_command_on_synthetic_batches(config_path: str) -> int:
    """What the subprocesses of the SIGTERM test run: `molmo2-jax train`, with the synthetic batches as its data."""
    configure()
    import functools
    import importlib

    from molmo2_jax.cli import main

    training_run = importlib.import_module("molmo2_jax.training.run")  # the module, not training.run the function
    training_run.run = functools.partial(training_run.run, batches=synthetic_batches(2))
    return main(["train", "--config", config_path])


def run_watching_stdout(command, env, stderr_path, on_line) -> int:
    """Run `command` (stderr to `stderr_path`), calling `on_line(proc, line)` for each line it prints; killed
    after 10 minutes. Returns its exit code."""
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        watchdog = threading.Timer(600, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                on_line(proc, line)
            return proc.wait()
        finally:
            watchdog.cancel()
            proc.kill()


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resuming_continues_identically(tmp_path):
    import yaml

    from molmo2_jax.checkpoint.formats import is_training_step
    from molmo2_jax.training.run import run

    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({**PREEMPT_SETTINGS, "run_dir": str(tmp_path / "run")}))
    command = [sys.executable, __file__, str(config_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    def on_line(proc, line):
        if line.startswith("step 2/6"):
            proc.send_signal(signal.SIGTERM)
        elif "received: saving step" in line:
            proc.send_signal(signal.SIGINT)  # a second signal while saving is ignored

    returncode = run_watching_stdout(command, env, tmp_path / "stderr", on_line)
    err = (tmp_path / "stderr").read_text()
    assert returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = re.fullmatch(r"molmo2-jax train: SIGTERM received: stopped after step (\d+); saved (\S+) \(run again "
                           r"with the same run_dir to resume\)", err.strip().splitlines()[-1])
    assert stopped, err[-3000:]
    step, saved = int(stopped[1]), Path(stopped[2])
    assert 2 <= step < 6 and saved == tmp_path / "run" / "checkpoints" / str(step)
    assert is_training_step(saved) and (saved / "data").is_dir()
    assert sorted(int(p.name) for p in saved.parent.iterdir() if p.name.isdigit()) == [step]

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {saved}" in resumed.stdout

    run(parse_train_config({**PREEMPT_SETTINGS, "run_dir": str(tmp_path / "reference")}),
        batches=synthetic_batches(2), log=lambda _: None)
    expected = event_scalars(tmp_path / "reference" / "tensorboard")
    got = event_scalars(tmp_path / "run" / "tensorboard")
    for s in range(1, 7):  # steps up to the interruption from the first process, the rest from the resumed one
        for tag in ("train/loss", "train/grad_norm"):
            assert got[(tag, s)] == expected[(tag, s)], (tag, s)


if __name__ == "__main__":
    sys.exit(_train_command_on_synthetic_batches(sys.argv[1]))
