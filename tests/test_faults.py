"""Faults that stop a run or leave debris (issue 22), each injected and checked for what the user sees (exit code,
the one line), what is left on disk and that the next run recovers: a corrupt latest step, a full disk during a
training save, a SIGTERM save, a conversion and an export, relative run paths, a run's tokenizer files, config
values of the wrong type, a max_bad_fraction stop and bad examples seen again every epoch.

A full disk is a small tmpfs mounted in a private user + mount namespace (`unshare -rm`, no root needed); where
the kernel does not allow that, those tests are skipped.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from batches import synthetic_batches
from test_data_common import synthetic_root  # noqa: F401  (fixture)
from test_data_pipeline import bad_manifest, pipeline_config
from test_export import read_tensors
from test_training import (  # noqa: F401  (train_step: fixture)
    PREEMPT_SETTINGS,
    run_watching_stdout,
    train_config,
    train_step,
)

from molmo2_jax.checkpoint.export import export_to_hf
from molmo2_jax.cli import main
from molmo2_jax.data.errors import TooManyBadExamplesError
from molmo2_jax.data.pipeline import Source, examples, take_bad_example_summary
from molmo2_jax.data.spm import processor_files
from molmo2_jax.training.checkpointing import Checkpointer
from molmo2_jax.training.loop import Trainer, initial_state

ROOT = Path(__file__).resolve().parent.parent
TRAINING_SCRIPT = str(ROOT / "tests" / "test_training.py")  # `molmo2-jax train` on synthetic batches
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(  # the script imports the test helpers
    filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))


# -- a corrupt latest step ------------------------------------------------------------------------------------


def _delete_largest_chunk(step_dir: Path) -> str:
    chunks = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    chunks[-1].unlink()
    return "Error reading"  # TensorStore's line names the array and the OCDBT database


def _truncate_data_state(step_dir: Path) -> str:
    (file,) = (step_dir / "data").glob("*.json")
    file.write_text(file.read_text()[:10])
    return f"{file}: not valid JSON"


@pytest.mark.parametrize("corrupt", [_delete_largest_chunk, _truncate_data_state])
def test_resume_falls_back_past_a_corrupt_latest_step(train_step, tmp_path, corrupt):
    config = train_step.train_config  # 4 steps, a checkpoint every 2
    full = Trainer(train_step, Checkpointer(tmp_path / "full", config.checkpoint), log=lambda _: None)
    data = synthetic_batches(2)
    full.run(train_step.init_state(0), data, data)
    full.checkpointer.close()
    expected = dict(full.history)

    checkpoints = tmp_path / "full"
    step_2 = {p: p.read_bytes() for p in (checkpoints / "2").rglob("*") if p.is_file()}
    reason = corrupt(checkpoints / "4")
    lines = []
    ckpt = Checkpointer(checkpoints, config.checkpoint)
    data = synthetic_batches(2)
    state = initial_state(train_step, ckpt, lambda: pytest.fail("should resume"), data, log=lines.append)
    assert int(state["step"]) == 2
    assert len(lines) == 2 and lines[1] == f"resuming from {checkpoints / '2'}", lines
    assert lines[0].startswith("checkpoint step 4 is unreadable (") and reason in lines[0], lines[0]
    assert lines[0].endswith(f"); moved it to {checkpoints / '4.unreadable'}, resuming from step 2"), lines[0]
    resumed = Trainer(train_step, ckpt, log=lines.append)
    resumed.run(state, data, data)
    ckpt.close()
    assert [s for s, _ in resumed.history] == [3, 4]
    for step, metrics in resumed.history:
        assert metrics["loss"] == expected[step]["loss"], f"step {step}"
    # nothing the other step needs was touched; the unreadable step is kept aside for inspection
    assert {p: p.read_bytes() for p in (checkpoints / "2").rglob("*") if p.is_file()} == step_2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "4.unreadable"]


# -- a full disk ---------------------------------------------------------------------------------------------


def _tiny_fs_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


needs_tiny_fs = pytest.mark.skipif(not _tiny_fs_available(), reason="no unprivileged user namespaces for a tmpfs")

_ON_TINY_FS = """size=$1 mnt=$2 keep=$3 seed=$4; shift 4
mount -t tmpfs -o size=${size}k tmpfs "$mnt" || exit 99
[ -z "$seed" ] || cp -a "$seed"/. "$mnt"/
"$@"; rc=$?
mkdir -p "$keep" && cp -a "$mnt"/. "$keep"/
exit $rc"""


def on_tiny_fs(size_kb: int, mount: Path, keep: Path, command: list[str], seed: Path | None = None) -> list[str]:
    """`command` with a fresh tmpfs of `size_kb` at `mount` (holding a copy of `seed`); what it leaves there is
    copied to `keep` afterwards."""
    mount.mkdir(exist_ok=True)
    return ["unshare", "-rm", "sh", "-c", _ON_TINY_FS, "sh", str(size_kb), str(mount), str(keep), str(seed or ""),
            *command]


def _training_command(tmp_path: Path, run_dir: Path, skip_space_check: bool = False, **settings) -> list[str]:
    """`molmo2-jax train` on the synthetic batches; `skip_space_check` lets a save run into the full disk."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**PREEMPT_SETTINGS, "run_dir": str(run_dir), **settings}))
    code = ("import runpy, sys\n"
            + ("from molmo2_jax.training.checkpointing import Checkpointer\n"
               "Checkpointer._check_free_space = lambda *a: None\n" if skip_space_check else "")
            + f"sys.argv = [{TRAINING_SCRIPT!r}, {str(config)!r}]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", code]


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@needs_tiny_fs
@pytest.mark.slow
@pytest.mark.parametrize("skip_space_check", [False, True], ids=["checked", "written"])
def test_full_disk_during_a_training_save(tmp_path, skip_space_check):
    """Checked: the save is refused before writing (the free space is less than the last step took). Written:
    without that check the save runs into the full disk, and one line (no traceback of Orbax's or TensorStore's
    writer threads) ends the run. Either way the partial step is gone, and a restart with room recovers."""
    disk, run = tmp_path / "disk", tmp_path / "disk" / "run"
    settings = {"steps": 4, "checkpoint": {"every": 2, "keep": 5}, "log": {"every": 1, "tensorboard": False}}
    command = _training_command(tmp_path, run, skip_space_check, **settings)
    # a step takes 2.4 MB: step 2 fits, step 4 does not
    result = subprocess.run(on_tiny_fs(3500, disk, tmp_path / "left", command), env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    line = _one_error_line(result.stderr)
    if skip_space_check:
        assert re.fullmatch(rf"molmo2-jax train: error: could not save step 4 to {run / 'checkpoints' / '4'}: no space "
                            r"left on device \(\d+(\.\d)? [KM]?B free\); its partial files are removed", line), line
    else:
        assert re.fullmatch(rf"molmo2-jax train: error: could not save step 4 to {run / 'checkpoints' / '4'}: no space "
                            r"left on device \(1\.\d MB free, a step takes about 2\.\d MB\); nothing was written",
                            line), line
    assert sorted(p.name for p in (tmp_path / "left" / "run" / "checkpoints").iterdir()) == ["2"]
    if not skip_space_check:
        return
    # A restart with room removes what a killed save would have left and resumes from step 2.
    (tmp_path / "left" / "run" / "checkpoints" / "4.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    result = subprocess.run(on_tiny_fs(20000, disk, tmp_path / "after", command, seed=tmp_path / "left"), env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / '2'}" in result.stdout
    assert sorted(p.name for p in (tmp_path / "after" / "run" / "checkpoints").iterdir()) == ["2", "4"]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@needs_tiny_fs
@pytest.mark.slow
def test_sigterm_whose_save_fails_still_exits_143(tmp_path):
    disk, run = tmp_path / "disk", tmp_path / "disk" / "run"
    command = _training_command(tmp_path, run, log={"every": 1, "tensorboard": False})
    def on_line(proc, line):
        if line.startswith("step 2/6"):  # the training process, not the shell around it
            os.kill(_children(proc.pid)[0], signal.SIGTERM)

    returncode = run_watching_stdout(on_tiny_fs(1500, disk, tmp_path / "left", command), ENV, tmp_path / "stderr",
                                     on_line)
    err = (tmp_path / "stderr").read_text()
    assert returncode == 128 + signal.SIGTERM, err[-3000:]
    line = _one_error_line(err)
    stopped = re.fullmatch(rf"molmo2-jax train: SIGTERM received: stopped after step (\d); could not save step \1 to "
                           rf"{run / 'checkpoints'}/\1: no space left on device \(1\.\d MB free, a step takes about "
                           r"\d\.\d MB\); nothing was written \(run again with the same run_dir to resume\)", line)
    assert stopped and 2 <= int(stopped[1]) < 6, line
    assert list((tmp_path / "left" / "run" / "checkpoints").iterdir()) == []


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from ref_model import make_reference

    path = tmp_path_factory.mktemp("hf")
    make_reference(path, "qwen3")
    return path


def _script_command(name: str, *argv: str, skip_space_check: bool = False) -> list[str]:
    """`molmo2-jax NAME` as a command; `skip_space_check` lets a write run into the full disk."""
    code = ("import sys; from molmo2_jax.cli import main\n"
            + ("from molmo2_jax.checkpoint import convert, export\n"
               "convert.check_free_space = export.check_free_space = lambda *a: None\n" if skip_space_check else "")
            + f"sys.exit(main([{name!r}, *sys.argv[1:]]))")
    return [sys.executable, "-c", code, *argv]


def _size_kb(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) // 1000


@needs_tiny_fs
@pytest.mark.slow
@pytest.mark.parametrize("skip_space_check", [False, True], ids=["checked", "written"])
def test_full_disk_during_conversion_and_export(hf_checkpoint, tmp_path, skip_space_check):
    """Checked: the free-space check refuses before writing. Written: without it, the writes hit the full disk
    (the conversion's Orbax write, after its scratch files fit; the export's shards) and still end in one line
    (the last), never a signal."""
    disk = tmp_path / "disk"
    source = _size_kb(hf_checkpoint)  # about the size of either output, and of the conversion's scratch files
    for name, src in (("convert", hf_checkpoint), ("export", tmp_path / "converted")):
        size = int(source * (1.4 if skip_space_check and name == "convert" else 0.5))
        if name == "export":
            assert main(["convert", str(hf_checkpoint), str(src)]) == 0
        keep = tmp_path / f"left_{name}"
        command = _script_command(name, str(src), str(disk / "out"), skip_space_check=skip_space_check)
        result = subprocess.run(on_tiny_fs(size, disk, keep, command), env=ENV, cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 1, result.stderr[-3000:]
        line = [x for x in result.stderr.strip().splitlines() if x.startswith(f"molmo2-jax {name}:")]
        assert len(line) == 1 and line[0] == result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        if skip_space_check:
            assert line[0].startswith(f"molmo2-jax {name}: error: {disk / 'out'}: the disk filled up during the "), line
            assert "; nothing was left behind (" in line[0] and line[0].endswith(" free without it)"), line
        else:
            assert line[0].startswith(f"molmo2-jax {name}: error: {disk}: not enough free space for the "), line
        assert list(keep.iterdir()) == []  # nothing at or beside DST


# -- paths, tokenizer files and warnings of an export ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(train_step, tmp_path_factory):
    """A training run (step 2) whose config names a vocab_from and a processor directory."""
    root = tmp_path_factory.mktemp("run")
    for name, files in (("vocab", ["tokenizer.json", "tokenizer_config.json"]), ("processor", [
            "preprocessor_config.json", "processor_config.json"])):
        (root / name).mkdir()
        for file in files:
            (root / name / file).write_text(json.dumps(processor_files().get(file, {})))
    config = train_config(root / "run", **{"model.vocab_from": str(root / "vocab"),
                                            "data.processor_dir": str(root / "processor"),
                                            "data.sources": [{"path": str(root / "data.jsonl")}]})
    ckpt = Checkpointer(root / "run" / "checkpoints", config.checkpoint)
    ckpt.save(2, train_step.init_state(0), train_step.model_config, config)
    ckpt.wait()
    ckpt.close()
    return root


def test_relative_and_absolute_run_paths_export_the_same(trained_run, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        export_to_hf(trained_run / "run", tmp_path / "absolute", log=None)
    monkeypatch.chdir(trained_run)
    export_to_hf("run", os.path.relpath(tmp_path / "relative", trained_run), log=None)
    a, b = read_tensors(tmp_path / "absolute"), read_tensors(tmp_path / "relative")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # the run's tokenizer and processor files are carried
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json"} <= {p.name for p in (tmp_path / "absolute").iterdir()}
    # config.json says what the processor files (the released 4B/8B values) say of the frame wrapping: the hub
    # model code reads it there
    read = lambda name: json.loads((tmp_path / "absolute" / name).read_text())
    assert read("config.json")["use_frame_special_tokens"] is read("processor_config.json")[
        "use_frame_special_tokens"] is False
    assert not [r for r in caplog.records if "ts_context=None" in r.getMessage()]


def test_export_of_a_run_whose_tokenizer_moved_fails_in_one_line(trained_run, tmp_path, capsys):
    moved = tmp_path / "vocab"
    shutil.move(trained_run / "vocab", moved)
    try:
        assert main(["export", str(trained_run / "run"), str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"molmo2-jax export: error: {trained_run / 'run' / 'checkpoints' / '2'}: the run's "
                           f"model.vocab_from {trained_run / 'vocab'} holds no tokenizer or processor files (is it "
                           "moved?); pass --tokenizer-from DIR to take them from elsewhere")
        assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["vocab"]
        assert main(["export", str(trained_run / "run"), str(tmp_path / "out"), "--tokenizer-from", str(moved)]) == 0
        assert (tmp_path / "out" / "tokenizer.json").is_file()
    finally:
        shutil.move(moved, trained_run / "vocab")


# -- config values, bad data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override,line", [
    ("steps=abc", "steps: expected int, got 'abc' (str)"),
    ("checkpoint.every=abc", "checkpoint.every: expected int, got 'abc' (str)"),
    ("optimizer.llm.lr=fast", "optimizer.llm.lr: expected float, got 'fast' (str)"),
    ("log.tensorboard=3", "log.tensorboard: expected bool, got 3 (int)"),
])
def test_config_values_of_the_wrong_type_are_named(override, line, capsys):
    assert main(["train", "--config", "tiny", override]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"molmo2-jax train: error: {line}"]


def test_max_bad_fraction_stop_saves_the_current_step_first(train_step, tmp_path):
    def failing_at(iterator, n):
        for i, batch in enumerate(iterator):
            if i == n:
                raise TooManyBadExamplesError("9 of 50 examples were bad, more than max_bad_fraction=0.05")
            yield batch

    lines = []
    ckpt = Checkpointer(tmp_path, train_step.train_config.checkpoint)
    data = synthetic_batches(2)
    with pytest.raises(TooManyBadExamplesError):  # while drawing the batch of step 4
        Trainer(train_step, ckpt, log=lines.append).run(train_step.init_state(0), failing_at(data, 3), data)
    assert ckpt.manager.all_steps() == [2, 3]
    assert lines[-1] == f"saved step 3 to {tmp_path / '3'} before stopping"
    # started again, the run repeats the batches of step 4 (the data position is the one before them)
    data = synthetic_batches(2)
    state = initial_state(train_step, ckpt, lambda: pytest.fail("should resume"), data, log=lines.append)
    resumed = Trainer(train_step, ckpt, log=lines.append)
    resumed.run(state, data, data)
    ckpt.close()
    full = Trainer(train_step, log=lambda _: None)
    full.run(train_step.init_state(0), synthetic_batches(2))
    assert resumed.history == [(4, dict(full.history)[4])]


def test_bad_examples_are_warned_once_per_run_and_counted(tmp_path, synthetic_root, caplog):  # noqa: F811
    manifest = bad_manifest(tmp_path, 12)
    config = pipeline_config(synthetic_root, sources=(Source(str(manifest)),), num_epochs=3, max_bad_fraction=0.3)
    take_bad_example_summary()
    with caplog.at_level(logging.WARNING, logger="molmo2_jax.data.pipeline"):
        assert len(list(examples(config))) == 36
    assert len(caplog.records) == 3  # one per bad line, not one per epoch
    assert take_bad_example_summary() == "skipped 9 bad example(s), 3 distinct, each warned once"
    assert take_bad_example_summary() is None
