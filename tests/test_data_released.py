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
    for name in ("vid1.mp4", "clip9.mp4", "source.mp4"):
        (media / name).write_bytes(b"")
    point_rows = [{"video_id": "vid1", "label": "ball", "question": "How many balls?", "count": 2,
                   "video_duration": 4.0, "clip_start": 0.0, "clip_end": 4.0, "annotator_unsure": False,
                   "two_fps_timestamps": [0.5, 2.0], "points": [[{"x": 10.0, "y": 20.0}], [{"x": 30.0, "y": 40.0}]]}]
    records, skipped = manifest_records("molmo2-videopoint", _rows(tmp_path, point_rows), media, log=None)
    assert not skipped and "clip" not in records[0]
    assert answer_text(records[0]["messages"][1], [], (40, 30), "m") == (
        '<points coords="0.5 1 100 200;2.0 2 300 400">ball</points>')

    track_rows = [{"id": "t1", "clip": "clip9", "fps": 4, "exp": "the dog", "w": 40, "h": 30, "mask_id": ["a"],
                   "points": [{"object_id": "a", "points": [[4.0, 3.0], [5.0, 3.0], None, [8.0, 6.0], [9.0, 6.0]]}]}]
    (record,), _ = manifest_records("molmo2-videotrack", _rows(tmp_path, track_rows), media, log=None)
    assert "clip" not in record
    # sampled at 2 fps: frames 0 and 4 (frame 2 is occluded)
    assert answer_text(record["messages"][1], [], (40, 30), "m") == (
        '<tracks coords="0.0 1 100 100;1.0 1 225 200">the dog</tracks>')


def test_video_point_clips_as_the_official_training_takes_them(tmp_path):
    """Molmo2VideoPoint.load (olmo/data/molmo2_datasets.py, max_seconds=63, clips from the metadata): a video over
    63 s is shown only through the row's clip, its times counted from the clip's start and floored to 0.5 s; a
    video up to 63 s whole; a long one without a usable clip is left out."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "long.mp4").write_bytes(b"")
    row = {"video_id": "long", "label": "ball", "question": "q", "count": 2, "video_duration": 90.0,
           "clip_start": 10.0, "clip_end": 73.0, "annotator_unsure": False, "two_fps_timestamps": [11.0, 72.5],
           "points": [[{"x": 10.0, "y": 20.0}], [{"x": 30.0, "y": 40.0}]]}
    rows = [row, dict(row, clip_start=10.25),  # off the 0.5 s grid: 0.75 -> 0.5, 62.25 -> 62.0
            dict(row, clip_start=None, clip_end=None), dict(row, clip_start=12.0),  # misses the point at 11 s
            dict(row, clip_end=80.0),  # 70 s
            dict(row, video_duration=60.0)]  # short: the whole video, times as they are
    records, skipped = manifest_records("molmo2-videopoint", _rows(tmp_path, rows), media, log=None)
    assert [r["clip"] for r in records[:2]] == [[10.0, 73.0], [10.25, 73.0]] and "clip" not in records[2]
    assert [s[0] for s in skipped] == ["2", "3", "4"]
    assert "a 90.0 s video without clip bounds" in skipped[0][1]
    assert "the clip 12.0-73.0 s of the 90.0 s video does not hold the annotated 11.0-72.5 s" in skipped[1][1]
    assert "the clip 10.0-80.0 s" in skipped[2][1]
    texts = [answer_text(r["messages"][1], [], (40, 30), "m") for r in records]
    assert texts == ['<points coords="1.0 1 100 200;62.5 2 300 400">ball</points>',
                     '<points coords="0.5 1 100 200;62.0 2 300 400">ball</points>',
                     '<points coords="11.0 1 100 200;72.5 2 300 400">ball</points>']
    example = parse_line({"manifest": str(tmp_path / "m.jsonl"), "line": 1, "text": json.dumps(records[0])})
    assert example["clip"] == (10.0, 73.0) and example["video"] == media / "long.mp4"


def test_track_rows_without_their_cut_clip_file_take_it_from_the_source_video(tmp_path):
    """Ai2's download cuts a tracking clip's frames start_frame..end_frame from its source video; with only the
    source video at hand the record names that clip of it (frame 0 of the annotations is start_frame)."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "source.mp4").write_bytes(b"")
    track = {"id": "t1", "clip": "cut", "video": "source", "start_frame": 8, "end_frame": 19, "fps": 4, "exp": "x",
             "mask_id": ["a"], "points": [{"object_id": "a", "points": [[4.0, 3.0], None, [5.0, 3.0]]}]}
    instruction = {"id": "i1", "clip": "cut", "video": "source", "start_frame": 8, "end_frame": 19, "fps": 4,
                   "sampling_fps": 2, "expression": "x", "mask_id": ["a"],
                   "frame_trajectories": [{"frame": 0, "time": 0.0, "points": [{"id": "a", "point": [1, 1]}]}]}
    for schema, row in (("molmo2-videotrack", track), ("molmo2-track-instruction", instruction)):
        (record,), _ = manifest_records(schema, _rows(tmp_path, [row]), media, log=None)
        assert record["video"] == str(media / "source.mp4") and record["clip"] == [2.0, 5.0]
        _, skipped = manifest_records(schema, _rows(tmp_path, [dict(row, video="gone")]), media, log=None)
        assert skipped == [(row["id"], f"no media file for gone in {media}")]


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


def test_multi_image_rows(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("s1", "s2", "q1", "q2"):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(media / f"{name}.jpg")
    point_rows = [{"image_urls": ["http://x/a.jpg", "http://x/b.jpg"], "image_sha256s": ["s1", "s2"],
                   "labels": ["cat", "cat"], "counts": [1, 1],
                   "points": [[{"x": 50.0, "y": 20.0}], [{"x": 10.0, "y": 90.0}]]},
                  {"image_urls": ["http://x/a.jpg"], "image_sha256s": ["s1", "s2"], "labels": ["cat"],
                   "points": [[]]}]
    records, skipped = manifest_records("molmo2-multiimagepoint", _rows(tmp_path, point_rows), media, log=None)
    assert skipped == [("1", "2 sha256s but 1 urls")]
    (record,) = records
    assert record["images"] == [str(media / "s1.jpg"), str(media / "s2.jpg")]
    assert record["messages"][0]["content"] == "Find cat in all images."
    # each point on its own image (1-based in the text), 0..100 -> 0..1000
    assert answer_text(record["messages"][1], [(40, 30), (40, 30)], None, "m") == (
        '<points coords="1 1 500 200;2 2 100 900">cat</points>')

    qa_rows = [{"image_urls": ["http://x/q1.jpg", "http://x/q2.jpg"],
                "qa_pairs": {"question": ["Which is brighter?", "And bigger?"], "answer": ["The first.", "Neither."]}},
               {"image_urls": ["http://x/q1.jpg"], "qa_pairs": {"question": ["?"], "answer": ["!"]}}]
    records, skipped = manifest_records("molmo2-multiimageqa", _rows(tmp_path, qa_rows), media, log=None)
    assert [s[0] for s in skipped] == ["1"] and "single image" in skipped[0][1]
    assert [m["content"] for m in records[0]["messages"]] == ["Which is brighter?", "The first.", "And bigger?",
                                                              "Neither."]


def test_synthetic_documents_with_embedded_images(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    media = tmp_path / "media"
    media.mkdir()
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png, format="PNG")
    page = {"bytes": png.getvalue(), "path": "page.png"}
    rows = [{"id": "doc1", "images": [page, page], "metadata": {"num_images": 2},
             "qa_pairs": {"question": ["What is the total?"], "explanation": ["3 + 4 = 7."], "answer": ["7"]}},
            {"id": "doc2", "images": [page] * 6, "metadata": {"num_images": 6},
             "qa_pairs": {"question": ["q"], "explanation": ["e"], "answer": ["a"]}}]
    data = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)  # the hub's layout: images as {bytes, path}
    records, skipped = manifest_records("molmo2-synmultiimageqa", data, media, log=None)
    assert [s[0] for s in skipped] == ["doc2"] and "at most 5" in skipped[0][1]
    (record,) = records
    assert record["images"] == [str(media / "doc1-0.png"), str(media / "doc1-1.png")]
    assert (media / "doc1-0.png").read_bytes() == png.getvalue()
    assert [m["content"] for m in record["messages"]] == [
        "What is the total? Provide reasoning steps and then give the short answer.", "3 + 4 = 7. Answer: 7"]


def test_caption_and_track_instruction_rows(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("v1.mp4", "clip3.mp4"):
        (media / name).write_bytes(b"")
    cap_rows = [{"video_id": "v1", "video_caption": "A dog runs.", "merged_caption": "m",
                 "video_frame_merged_caption": "A brown dog runs across a park.", "annotation_score": 4},
                {"video_id": "v1", "video_caption": "x", "annotation_score": 2}]
    records, skipped = manifest_records("molmo2-cap", _rows(tmp_path, cap_rows), media, log=None)
    assert [s[0] for s in skipped] == ["1"] and "annotation_score 2" in skipped[0][1]
    assert [m["content"] for m in records[0]["messages"]] == [
        "Caption the video with 1 or two sentences", "A dog runs.", "Describe this video.",
        "A brown dog runs across a park."]

    track_rows = [{"id": "t1", "clip": "clip3", "fps": 30, "sampling_fps": 2, "expression": "the dog",
                   "width": 40, "height": 30, "mask_id": ["7", "9"],
                   "frame_trajectories": [
                       {"frame": 15, "time": 0.5, "points": [{"id": 9, "point": [8.0, 6.0], "occluded": False},
                                                             {"id": 7, "point": [4.0, 3.0], "occluded": True}]},
                       {"frame": 0, "time": 0.0, "points": [{"id": 7, "point": [4.0, 3.0], "occluded": False}]}]},
                  {"id": "t2", "clip": "clip3", "fps": 30, "sampling_fps": 2, "expression": "x", "mask_id": ["1"],
                   "frame_trajectories": [{"frame": 0, "time": 0.0, "points": [{"id": 5, "point": [1, 1]}]}]}]
    records, skipped = manifest_records("molmo2-track-instruction", _rows(tmp_path, track_rows), media, log=None)
    assert skipped == [("t2", "point of object 5, which mask_id does not list")]
    (record,) = records
    assert record["messages"][0]["content"] == "Track the dog in 2 FPS."
    # objects numbered in mask_id order; the occluded point is left out
    assert answer_text(record["messages"][1], [], (40, 30), "m") == (
        '<tracks coords="0.0 1 100 100;0.5 2 200 200">the dog</tracks>')


def test_subtitleqa_rows_carry_their_videos_subtitles(tmp_path, capsys):
    """Molmo2-VideoSubtitleQA's parquet (subtitle: list of {start, end, text} in seconds) -> a video's questions
    with its subtitles, which the manifest holds and the pipeline writes after the frames."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    media = tmp_path / "media"
    media.mkdir()
    for name in ("v", "w"):
        (media / f"{name}.mp4").write_bytes(b"")
    subtitles = [{"start": 0.0, "end": 2.5, "text": "Welcome back."}, {"start": 2.5, "end": 4.0, "text": "Today:"},
                 {"start": 0.0, "end": 2.5, "text": "Welcome back!"}]  # same times: the later text, first place
    row = {"video_id": "v", "Question": "What does the host say first?", "Answer": "Welcome back!",
           "NegativeAnswers": ["Goodbye."], "Category": "speech", "subtitle": subtitles}
    rows = [row, dict(row, Question="Then?", Answer="Today", subtitle=subtitles[:1]),  # a video's rows share them
            dict(row, video_id="w", subtitle=[{"start": None, "end": 1.0, "text": "?"}])]  # unparsable
    path = tmp_path / "SubtitleQA-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "train.jsonl"
    assert main(["convert-dataset", "--schema", "molmo2-subtitleqa", "--data", str(path), "--media", str(media),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "(id w): the subtitle column: subtitle 0 is not {start, end (seconds), text}: {'start': None" in err
    (line,) = out.read_text().splitlines()
    example = parse_line({"manifest": str(out), "line": 1, "text": line})
    assert example["messages"][0] == {"role": "subtitle", "subtitles": [
        {"start": 0.0, "end": 2.5, "text": "Welcome back!"}, {"start": 2.5, "end": 4.0, "text": "Today:"}]}
    assert [m["role"] for m in example["messages"][1:]] == ["user", "assistant"] * 2
    assert example["messages"][2]["content"].endswith(". Welcome back!")
