"""Released-dataset rows -> training manifest records whose answers the pipeline formats the Molmo2 way."""

import json

import numpy as np
from PIL import Image

from molmo2_jax.cli import main
from molmo2_jax.data.conversation import answer_text
from molmo2_jax.data.manifest import parse_line
from molmo2_jax.data.released import manifest_records


def _rows(tmp_path, rows):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def test_pixmo_points_rows_become_pointing_and_counting_examples(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(media / "abc123.jpg")  # named by sha256
    rows = [{"image_url": "http://x/cats.jpg", "image_sha256": "abc123", "label": "cats", "count": 2,
             "collection_method": "counting", "points": [{"x": 50.0, "y": 20.0}, {"x": 10.0, "y": 90.0}]},
            {"image_url": "http://x/gone.jpg", "image_sha256": "gone", "label": "dogs", "points": []}]
    records, skipped = manifest_records("pixmo-points", _rows(tmp_path, rows), media, style="count", log=None)
    assert skipped == [("1", f"no media file for gone / gone.jpg in {media}")]
    (record,) = records
    assert record["image"] == str(media / "abc123.jpg")
    assert record["messages"][0]["content"] == "How many cats are there?"
    # 0..100 annotations -> 0..1000 text coordinates, sorted by x
    assert answer_text(record["messages"][1], [(40, 30)], None, "m") == (
        'Counting the <points coords="1 1 100 900 2 500 200">cats</points> shows a total of 2.')


def test_video_point_and_track_rows(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("vid1.mp4", "clip9.mp4"):
        (media / name).write_bytes(b"")
    point_rows = [{"video_id": "vid1", "label": "ball", "question": "How many balls?", "count": 2,
                   "video_duration": 4.0, "clip_start": 0.0, "clip_end": 4.0, "annotator_unsure": False,
                   "two_fps_timestamps": [0.5, 2.0], "points": [[{"x": 10.0, "y": 20.0}], [{"x": 30.0, "y": 40.0}]]},
                  {"video_id": "vid1", "label": "ball", "question": "q", "count": 1, "video_duration": 90.0,
                   "clip_start": 10.0, "clip_end": 73.0, "annotator_unsure": False,
                   "two_fps_timestamps": [11.0], "points": [[{"x": 1.0, "y": 1.0}]]}]
    records, skipped = manifest_records("molmo2-videopoint", _rows(tmp_path, point_rows), media, log=None)
    assert [s[0] for s in skipped] == ["1"] and "clip 10.0-73.0" in skipped[0][1]
    assert answer_text(records[0]["messages"][1], [], (40, 30), "m") == (
        '<points coords="0.5 1 100 200;2.0 2 300 400">ball</points>')

    track_rows = [{"id": "t1", "clip": "clip9", "fps": 4, "exp": "the dog", "w": 40, "h": 30, "mask_id": ["a"],
                   "points": [{"object_id": "a", "points": [[4.0, 3.0], [5.0, 3.0], None, [8.0, 6.0], [9.0, 6.0]]}]}]
    (record,), _ = manifest_records("molmo2-videotrack", _rows(tmp_path, track_rows), media, log=None)
    # sampled at 2 fps: frames 0 and 4 (frame 2 is occluded)
    assert answer_text(record["messages"][1], [], (40, 30), "m") == (
        '<tracks coords="0.0 1 100 100;1.0 1 225 200">the dog</tracks>')


def test_convert_dataset_command_and_a_file_in_another_schema(tmp_path, capsys):
    media = tmp_path / "media"
    media.mkdir()
    (media / "v.mp4").write_bytes(b"")
    rows = _rows(tmp_path, [{"video_id": "v", "question": "What happens?", "answer": "A dog runs."},
                            {"video_id": "w", "question": "Where?", "answer": "Park"},  # no video w
                            {"video_id": "v", "question": "Why?", "answer": " "},  # unanswered: dropped
                            {"video_id": "v", "question": "Who?", "answer": "A dog."}])
    out = tmp_path / "train.jsonl"
    assert main(["convert_dataset", "--schema", "molmo2-humanqa", "--data", str(rows), "--media", str(media),
                 "--out", str(out)]) == 0
    (line,) = out.read_text().splitlines()
    example = parse_line({"manifest": str(out), "line": 1, "text": line})  # what the pipeline reads
    assert example["video"] == media / "v.mp4"
    # a video's questions become one conversation, as the official loader groups them
    assert [m["content"] for m in example["messages"]] == ["What happens?", "A dog runs.", "Who?", "A dog."]
    capsys.readouterr()
    assert main(["convert_dataset", "--schema", "pixmo-count", "--data", str(rows), "--media", str(media),
                 "--out", str(tmp_path / "other.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "not a pixmo-count file: rows lack label, count, points" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "other.jsonl").exists()


def test_capqa_rows_become_lettered_multiple_choice_turns(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "v.mp4").write_bytes(b"")
    rows = [{"video_id": "v", "Question": "What colour is the car?", "Answer": "red",
             "NegativeAnswers": ["blue", "green", "black"], "Category": "attribute"}]
    (record,), _ = manifest_records("molmo2-capqa", _rows(tmp_path, rows), media, log=None)
    question, answer = (m["content"] for m in record["messages"])
    lines = question.splitlines()
    assert lines[:2] == ["What colour is the car?", "Only return the correct answer option."]
    options = dict(line.split(". ", 1) for line in lines[2:])
    assert sorted(options) == ["A", "B", "C", "D"] and sorted(options.values()) == ["black", "blue", "green", "red"]
    letter = next(k for k, v in options.items() if v == "red")
    assert answer == f"{letter}. red"
    again, _ = manifest_records("molmo2-capqa", _rows(tmp_path, rows), media, log=None)
    assert again[0] == record  # the same file on a rerun
