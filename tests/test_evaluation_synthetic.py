"""The synthetic set scored with the official metrics: its own answers are perfect, wrong ones are not, it is
read by the same reader as the released sets (so `molmo2-jax score` scores it), and the plot and drawings of
the main job come out."""

import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from molmo2_jax.cli import main
from molmo2_jax.data.synthetic import SyntheticConfig, make_example
from molmo2_jax.evaluation import metrics, report, synthetic
from molmo2_jax.evaluation.datasets import read_examples

CONFIG = SyntheticConfig(num_train=4, num_eval=60, seed=5, image_size=224, object_size=(32, 48), max_count=4,
                         max_distractors=2)
HEADLINE = {"pointing": "f1", "count": "correct", "video_count": "correct", "tracking": "f1"}


def _records(task: str, count: bool = True, n: int = 2):
    """Records of a task whose asked-about count is (not) zero."""
    found = []
    for index in range(400):
        record = make_example(CONFIG, "validation", index) if len(found) < n else None
        if record is None:
            break
        if record["task"] == task and bool(json.loads(record["truth"])["count"]) == count:
            found.append(record)
    assert len(found) == n, f"too few {task} records"
    return found


def _score(record, text):
    task, example = synthetic.example(record)
    return metrics.score(task, [example.truth], [text])


def _true_answer(record):
    return json.loads(record["messages"])[1]["content"]


@pytest.mark.parametrize("task", ["point", "count", "video_count", "track"])
def test_the_sets_own_answers_score_perfectly_and_wrong_ones_do_not(task):
    official = synthetic.TASKS[task]
    for record in _records(task):
        right = _score(record, _true_answer(record))
        assert right[HEADLINE[official]] == pytest.approx(1.0)
        if official == "tracking":
            assert right["hota"] == pytest.approx(1.0)
        assert _score(record, "There are none.")[HEADLINE[official]] == 0.0
        if official in ("pointing", "tracking"):  # every point moved to a corner, where no object is
            corner = re.sub(r"\b(\d+) \d{3,4} \d{3,4}\b", r"\1 001 001", _true_answer(record))
            assert corner != _true_answer(record) and _score(record, corner)["precision"] == 0.0


def test_zero_counts_score_as_officially():
    point, count, video_count = (_records(t, count=False, n=1)[0] for t in ("point", "count", "video_count"))
    assert _true_answer(point) == "There are none."
    assert _score(point, "There are none.")["f1"] == pytest.approx(1.0)
    assert _score(point, _true_answer(_records("point")[0]))["f1"] == 0.0  # points where there is nothing
    assert _score(count, "There are none.")["correct"] == pytest.approx(1.0)
    # officially "There are none." is no number for video counting: the right answer scores 0
    assert _score(video_count, _true_answer(video_count))["correct"] == 0.0


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    from molmo2_jax.data.tfds_builder import build_synthetic

    config = dataclasses.replace(CONFIG, task_weights=(("point", 0.4), ("count", 0.3), ("caption", 0.1),
                                                       ("track", 0.1), ("video_count", 0.1)))
    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", config, vocab_size=400, crop_size=224)


def test_score_command_reads_the_set_like_a_released_one(synthetic_set, tmp_path, capsys):
    by_task = synthetic.read_examples(synthetic_set)
    assert all(by_task[t] for t in HEADLINE), {t: len(e) for t, e in by_task.items()}
    for task, examples in by_task.items():
        assert [e.id for e in read_examples(task, synthetic_set)[0]] == [e.id for e in examples]
        assert all((e.image is None) != (e.video is None) for e in examples)
    from molmo2_jax.data.tfds_builder import data_source, dataset_dir

    source = data_source(dataset_dir(synthetic_set), "validation")
    truth = {source[i]["id"].decode(): _true_answer(source[i]) for i in range(len(source))}
    predictions = tmp_path / "predictions.jsonl"
    for task in HEADLINE:
        predictions.write_text("".join(json.dumps({"id": e.id, "prediction": truth[e.id]}) + "\n"
                                       for e in by_task[task]))
        assert main(["score", "--task", task, "--data", str(synthetic_set), "--predictions", str(predictions)]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["examples"] == len(by_task[task])
        if task != "video_count":  # zero counts are wrong there, officially
            assert result[HEADLINE[task]] == pytest.approx(1.0)
    assert main(["score", "--task", "point_bench", "--data", str(synthetic_set), "--predictions",
                 str(predictions)]) != 0
    assert "has no point_bench examples" in capsys.readouterr().err


def test_plot_and_drawings_are_written(synthetic_set, tmp_path):
    history = {0: {"pointing": {"f1": 0.0, "precision": 0.0, "recall": 0.0}, "tracking": {"f1": 0.0, "hota": 0.0}},
               400: {"pointing": {"f1": 0.5, "precision": 0.6, "recall": 0.4}, "tracking": {"f1": None, "hota": 0.2}}}
    plot = report.plot_metrics(history, tmp_path / "metrics.png", "test")
    assert Image.open(plot).size == (800, 480)

    examples = [e for e in synthetic.read_examples(synthetic_set)["pointing"] if len(e.truth.points)][:2]
    from molmo2_jax.data.tfds_builder import data_source, dataset_dir

    source = data_source(dataset_dir(synthetic_set), "validation")
    right = {source[i]["id"].decode(): _true_answer(source[i]) for i in range(len(source))}
    drawn = np.asarray(Image.open(report.draw_examples(
        examples, {"none": {e.id: "There are none." for e in examples}, "right": right}, tmp_path / "ex.png")))
    marker = np.all(drawn == (230, 25, 75), axis=-1)  # the first colour of the point palette
    width = drawn.shape[1] // 2
    assert marker[:, width:].any() and not marker[:, :width].any()  # points drawn in the "right" column only

    track = synthetic.read_examples(synthetic_set)["tracking"][0]
    gif = report.draw_track(track, right[track.id], tmp_path / "track.gif")
    assert Image.open(gif).n_frames > 1


def test_bad_runs_and_sets_are_one_line_errors(synthetic_set, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["eval-synthetic", "--run", str(run), "--data", str(synthetic_set)]) != 0
    assert "no saved training step" in capsys.readouterr().err
    for part in ("state", "config"):  # what marks a saved step; nothing is read before the checks
        (run / "checkpoints" / "400" / part).mkdir(parents=True)
    assert main(["eval-synthetic", "--run", str(run), "--data", str(synthetic_set), "--steps", "0", "300"]) != 0
    assert "has no saved step [300] (saved: [400])" in capsys.readouterr().err
    assert main(["eval-synthetic", "--run", str(run), "--data", str(tmp_path)]) != 0
    assert "not a synthetic set" in capsys.readouterr().err
