"""Clips in training examples: a manifest line or TFDS record naming `clip` [start, end] trains on that part of its
video exactly as on a file holding just it (Ai2's loaders show a clip so: olmo/data/video_loader.py), released
Molmo2-VideoPoint rows over 63 s become their clip, bad clips are one line naming the example, and records built
before the field read as whole videos."""

import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from eval_fixtures import write_lossless_mp4
from ref_tokenizer import make_tokenizer_dir

from molmo2_jax.data.conversation import tokenize_conversation
from molmo2_jax.data.errors import BadExampleError
from molmo2_jax.data.manifest import ManifestSource, parse_line
from molmo2_jax.data.pipeline import PipelineConfig, Source, examples
from molmo2_jax.data.released import manifest_records
from molmo2_jax.data.tfds_builder import SyntheticShapes
from molmo2_jax.preprocessing import Molmo2Processor
from molmo2_jax.preprocessing.collate import Bucket

FPS, H, W = 2, 32, 48
POINTS = {"role": "assistant", "label": "ball", "points": [{"t": 0.5, "x": 10, "y": 20}, {"t": 2.0, "x": 40, "y": 8}]}
MESSAGES = [{"role": "user", "content": "Point to the ball."}, POINTS]
BUCKETS = (Bucket(seq_len=2048, max_crops=6, max_image_tokens=1200, max_frames=12, max_video_tokens=972),)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), "qwen3", extra_words=["Point", "ball"])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """6 s at 2 fps (`full.mp4`) and its last 3 s cut into `cut.mp4`."""
    d = tmp_path_factory.mktemp("media")
    frames = np.random.default_rng(0).integers(0, 256, (6 * FPS, H, W, 3), dtype=np.uint8)
    write_lossless_mp4(d / "full.mp4", frames, fps=FPS)
    write_lossless_mp4(d / "cut.mp4", frames[3 * FPS:], fps=FPS)
    return d


def _same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if key != "name":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _tokenize(processor, raw):
    return tokenize_conversation(processor, raw["messages"], raw["images"], raw["video"], name=raw["id"],
                                 clip=raw["clip"])


def test_a_manifest_clip_trains_as_the_file_holding_just_it(tmp_path, processor_dir, media):
    manifest = tmp_path / "m.jsonl"
    lines = [{"id": "clip", "video": str(media / "full.mp4"), "clip": [3, 6], "messages": MESSAGES},
             {"id": "past-end", "video": str(media / "full.mp4"), "clip": [3.0, 30.0], "messages": MESSAGES},
             {"id": "cut", "video": str(media / "cut.mp4"), "messages": MESSAGES},
             {"id": "whole", "video": str(media / "full.mp4"), "messages": MESSAGES}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = ManifestSource(manifest)
    raws = [parse_line(source[n]) for n in range(len(lines))]
    assert [r["clip"] for r in raws] == [(3.0, 6.0), (3.0, 30.0), None, None]
    processor = Molmo2Processor.from_pretrained(processor_dir)
    clip, past_end, cut, whole = (_tokenize(processor, r) for r in raws)
    _same(clip, cut)  # frames, their times in the prompt, the answer's times: all counted from 3 s
    _same(past_end, cut)  # an end past the video is cut to it, as Ai2's loaders cut it
    assert len(whole["pixel_values_videos"]) > len(clip["pixel_values_videos"])
    assert "0.5 1 208 625" in processor.tokenizer.decode(clip["input_ids"])  # t=0.5 of the clip, x,y on 0..1000


def test_bad_clips_are_one_line_naming_the_example(tmp_path, processor_dir, media):
    manifest = tmp_path / "bad.jsonl"
    video = str(media / "full.mp4")
    lines = [{"id": "backwards", "video": video, "clip": [5.0, 2.0], "messages": MESSAGES},
             {"id": "no-video", "image": "x.png", "clip": [0, 1], "messages": MESSAGES},
             {"id": "text", "video": video, "clip": "3-6", "messages": MESSAGES},
             {"id": "negative", "video": video, "clip": [-1, 2], "messages": MESSAGES},
             {"id": "after", "video": video, "clip": [7.0, 9.0], "messages": MESSAGES}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = ManifestSource(manifest)
    errors = []
    for n in range(4):
        with pytest.raises(BadExampleError) as e:
            parse_line(source[n])
        errors.append(str(e.value))
    assert all(m.startswith(f"{manifest}:{n} ({lines[n - 1]['id']}): ") and "\n" not in m
               for n, m in enumerate(errors, 1))
    assert "clip 5.0-2.0 s must start at 0 s or later and end after it starts" in errors[0]
    assert "a 'clip' needs a 'video'" in errors[1]
    assert "clip must be [start, end] in seconds, got '3-6'" in errors[2]
    assert "clip -1.0-2.0 s must start" in errors[3]
    # inside the video or not is known when it is decoded
    with pytest.raises(BadExampleError) as e:
        _tokenize(Molmo2Processor.from_pretrained(processor_dir), parse_line(source[4]))
    message = str(e.value)
    assert message.startswith(f"{manifest}:5 (after): ") and "\n" not in message
    assert "clip 7.0-9.0 s is not inside the 6.00 s video" in message
    with pytest.raises(BadExampleError, match="ex: a clip needs a video file"):
        tokenize_conversation(Molmo2Processor.from_pretrained(processor_dir), MESSAGES, clip=(0.0, 1.0), name="ex")


def test_a_videopoint_row_over_63_s_trains_on_its_clip(tmp_path, processor_dir):
    """A released Molmo2-VideoPoint row of a 64 s video with clip 61-64 s: the training example is the one of
    the cut 3 s file with the points' times counted from 61 s (Molmo2VideoPoint.load)."""
    d = tmp_path / "media"
    d.mkdir()
    frames = np.random.default_rng(1).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)  # 64 s at 1 fps
    write_lossless_mp4(d / "long.mp4", frames, fps=1)
    write_lossless_mp4(d / "long_cut.mp4", frames[61:], fps=1)
    row = {"video_id": "long", "label": "ball", "question": "q", "count": 2, "video_duration": 64.0,
           "clip_start": 61.0, "clip_end": 64.0, "annotator_unsure": False, "two_fps_timestamps": [61.5, 63.0],
           "points": [[{"x": 10.0, "y": 20.0}], [{"x": 30.0, "y": 40.0}]]}
    (data := tmp_path / "rows.json").write_text(json.dumps([row]))
    (record,), _ = manifest_records("molmo2-videopoint", data, d, log=None)
    cut_record = {**{k: v for k, v in record.items() if k != "clip"}, "video": str(d / "long_cut.mp4")}
    assert [p["t"] for p in record["messages"][1]["points"]] == [0.5, 2.0]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps(record) + "\n" + json.dumps(cut_record) + "\n")
    source = ManifestSource(manifest)
    processor = Molmo2Processor.from_pretrained(processor_dir)
    clip, cut = (_tokenize(processor, parse_line(source[n])) for n in range(2))
    _same(clip, cut)
    assert len(clip["pixel_values_videos"]) == 7  # 0, 0.5, ..., 3 s of the clip


class ClipRecords(SyntheticShapes):
    """Given records in the synthetic set's layout (one `train` split)."""

    def __init__(self, *, records, **kwargs):
        self.records = records
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        return {"train": enumerate(self.records)}


class RecordsBeforeClips(ClipRecords):
    """The layout before `clip`."""

    def _info(self):
        info = super()._info()
        features = {k: v for k, v in info.features.items() if k != "clip"}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))


def _tfds(root, builder, records):
    b = builder(records=records, data_dir=str(root), file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return str(b.data_dir)


def test_the_pipeline_reads_clips_from_manifests_and_tfds_and_records_without_them(tmp_path, processor_dir, media,
                                                                                   caplog):
    full, cut = (media / "full.mp4").read_bytes(), (media / "cut.mp4").read_bytes()
    record = {"task": "point", "images": [], "messages": json.dumps(MESSAGES), "truth": "{}"}
    new = _tfds(tmp_path / "new", ClipRecords, [
        {**record, "id": "clip", "video": full, "clip": np.array([3.0, 6.0])},
        {**record, "id": "cut", "video": cut, "clip": np.zeros(0)},
        {**record, "id": "after", "video": full, "clip": np.array([6.5, 8.0])}])
    old = _tfds(tmp_path / "old", RecordsBeforeClips, [{**record, "id": "cut", "video": cut}])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in [
        {"id": "clip", "video": str(media / "full.mp4"), "clip": [3, 6], "messages": MESSAGES},
        {"id": "backwards", "video": str(media / "full.mp4"), "clip": [3, 1], "messages": MESSAGES}]))
    got = {}
    with caplog.at_level(logging.WARNING):
        for path in (new, old, str(manifest)):  # one at a time: a mixture ends with its shortest source
            config = PipelineConfig(processor_dir=str(processor_dir), sources=(Source(path),), buckets=BUCKETS,
                                    shuffle=False, num_epochs=1, max_bad_fraction=1.0, process_index=0,
                                    process_count=1)
            got.update((ex["name"], ex) for ex in examples(config))
    assert sorted(got) == sorted([f"{new}[clip]", f"{new}[cut]", f"{old}[cut]", f"{manifest}:1 (clip)"])
    for name in (f"{new}[clip]", f"{old}[cut]", f"{manifest}:1 (clip)"):
        _same(got[name], got[f"{new}[cut]"])
    warnings = [r.getMessage() for r in caplog.records if "skipping bad example" in r.getMessage()]
    assert len(warnings) == 2
    assert any(f": {new}[after]: " in w and "clip 6.5-8.0 s is not inside the 6.00 s video" in w for w in warnings)
    assert any(f"{manifest}:2 (backwards): clip 3.0-1.0 s must start" in w for w in warnings)
