"""`molmo2-jax score`: a predictions file against an eval set in a released schema, and its bad inputs."""

import json

import eval_fixtures as F
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from molmo2_jax.cli import main


def _write(tmp_path, rows, texts, name="data.json"):
    data = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        data.write_text(json.dumps(rows))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": n, "prediction": t}) + "\n" for n, t in enumerate(texts)))
    return data, predictions


def _score(capsys, *argv):
    code = main(["score", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_score_gives_the_official_numbers_from_a_parquet_file(tmp_path, capsys):
    rows, texts = F.pointing_set()
    data, predictions = _write(tmp_path, rows, texts, "pixmo-points-eval.parquet")
    code, out, _ = _score(capsys, "--task", "pointing", "--data", data, "--predictions", predictions,
                          "--out", tmp_path / "metrics.json")
    assert code == 0
    result = json.loads(out)
    # official PointingEval on this set (see test_evaluation_metrics.py)
    assert result["f1"] == pytest.approx(0.5727272629737854, abs=1e-6)
    assert result["precision"] == pytest.approx(0.560606062412262, abs=1e-6)
    assert (result["examples"], result["data_without_prediction"], result["predictions_without_data"]) == (11, 0, 0)
    assert json.loads((tmp_path / "metrics.json").read_text()) == result


def test_a_missing_prediction_is_an_empty_answer_and_both_kinds_of_stray_ids_are_counted(tmp_path, capsys):
    rows, texts = F.video_count_set()
    data, predictions = _write(tmp_path, rows, texts)
    lines = predictions.read_text().splitlines()
    # drop example 0 (a correct "3"), add an id the data does not have
    predictions.write_text("\n".join(lines[1:] + [json.dumps({"id": "nope", "prediction": "3"})]) + "\n")
    code, out, err = _score(capsys, "--task", "video_count", "--data", data, "--predictions", predictions)
    result = json.loads(out)
    assert code == 0 and result["correct"] == 0.125  # official 0.25 with example 0 answered right
    assert (result["data_without_prediction"], result["predictions_without_data"]) == (1, 1)
    assert "1 examples have no prediction" in err


def test_tracking_is_keyed_by_the_row_ids_and_reports_hota(tmp_path, capsys):
    rows, texts = F.tracking_set()
    data, predictions = _write(tmp_path, rows, texts)
    predictions.write_text("".join(json.dumps({"id": r["id"], "prediction": t}) + "\n"
                                   for r, t in reversed(list(zip(rows, texts)))))  # order does not matter
    code, out, _ = _score(capsys, "--task", "tracking", "--data", data, "--predictions", predictions)
    result = json.loads(out)
    # official VideoObjectTrackingEval on this set (see test_evaluation_metrics.py)
    assert code == 0 and result["hota"] == pytest.approx(0.5384358167648315, abs=1e-6)
    assert result["f1"] == pytest.approx(0.4475308656692505, abs=1e-6)
    # per config (our addition): the mean of the official per-example HOTA of the 7 "sports" rows
    sports = [0.6831300510639732, 0.4472135954999579, 0.6055300708194983, 0, 0.6123724356957945,
              0.7905694150420949, 0.7071067811865476]
    assert result["hota_sports"] == pytest.approx(sum(sports) / 7)


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys):
    rows, texts = F.video_pointing_set()
    data, predictions = _write(tmp_path, rows, texts)
    out_file = tmp_path / "metrics.json"

    def fails(*argv):
        code, out, err = _score(capsys, *argv, "--out", out_file)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        assert not out_file.exists() and not list(tmp_path.glob(".metrics.json*"))
        return err

    assert "unknown task 'pointng'" in fails("--task", "pointng", "--data", data, "--predictions", predictions)

    err = fails("--task", "tracking", "--data", data, "--predictions", predictions)
    assert "not a tracking data file: rows lack fps, w, h, mask_id" in err and str(data) in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "prediction": "x"}\nnot json\n{"id": 1}\n{"id": 0, "prediction": "y"}\n')
    err = fails("--task", "video_pointing", "--data", data, "--predictions", bad)
    assert "malformed lines 2 (not JSON), 3" in err and "4 (id 0 given twice)" in err

    rows = json.loads(json.dumps(rows))  # the fixture's rows share objects
    rows[1]["masks"][0][0]["rle"] = F.rle(F.A)
    rows[1]["masks"][0][0]["rle"]["size"] = [F.W, F.H]  # transposed
    data.write_text(json.dumps(rows))
    err = fails("--task", "video_pointing", "--data", data, "--predictions", predictions)
    assert "row 1 (id 1): mask size 30x40 disagrees with the video's 40x30" in err
