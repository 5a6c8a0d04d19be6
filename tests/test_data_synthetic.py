"""The synthetic grounding set: answers parse back with the grounding parser to the drawn objects, the TFDS
files read back without TensorFlow, and its tokenizer directory loads as a Molmo2 processor."""

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_data_common import SMALL, synthetic_root  # noqa: F401  (fixture)

from molmo2_jax.config import Molmo2Config, from_dict
from molmo2_jax.data.spm import model_token_settings
from molmo2_jax.data.synthetic import COLORS, SyntheticConfig, make_spec, sample_frame_times
from molmo2_jax.data.tfds_builder import EVAL_SPLIT, TRAIN_SPLIT, data_source, dataset_dir
from molmo2_jax.grounding import parse, parse_count
from molmo2_jax.preprocessing import Molmo2Processor

CONFIG = dataclasses.replace(SMALL, num_train=300)
SIZE = (CONFIG.image_size, CONFIG.image_size)
TOLERANCE = CONFIG.image_size / 1000  # one unit of the 0..1000 scale


def _specs(task: str, n: int = 12):
    found = [s for s in (make_spec(CONFIG, "train", i) for i in range(CONFIG.num_train)) if s["task"] == task]
    assert len(found) >= n, f"too few {task} examples"
    return found[:n]


def _centres(spec, frame: int = 0):
    return sorted(o["track"][frame] for o in spec["objects"]
                  if f"{o['color']} {o['shape']}s" == spec["label"])


@pytest.mark.parametrize("task", ["point", "count"])
def test_image_answers_parse_back_to_the_objects(task):
    zeros = 0
    for spec in _specs(task, 20):
        answer = spec["messages"][1]["content"]
        groundings = parse(answer, image_sizes=[SIZE])
        centres = _centres(spec)
        assert parse_count(answer) == spec["count"] == len(centres)
        if not centres:
            zeros += 1
            assert groundings == []
            continue
        (g,) = groundings
        assert g.label == spec["label"]
        got = sorted((p.x, p.y) for p in g.points)
        np.testing.assert_allclose(got, centres, atol=TOLERANCE)
    assert zeros > 0, "counting 0 must occur"


def test_track_answers_parse_back_to_each_frame():
    times, frames = sample_frame_times(CONFIG)
    for spec in _specs("track", 8):
        (g,) = parse(spec["messages"][1]["content"], video_size=SIZE)
        objects = [o for o in spec["objects"] if f"{o['color']} {o['shape']}s" == spec["label"]]
        assert len(g.tracks) == len(objects) >= 1
        for track in g.tracks:
            assert [t for t, _, _ in track.points] == pytest.approx(list(times))
            # the parsed track follows one drawn object through every sampled frame
            errors = [max(abs(x - o["track"][f][0]) + abs(y - o["track"][f][1])
                          for (_, x, y), f in zip(track.points, frames)) for o in objects]
            assert min(errors) <= 2 * TOLERANCE


def test_video_counts_and_other_answers():
    for spec in _specs("video_count", 6):
        answer = spec["messages"][1]["content"]
        assert parse_count(answer) == spec["count"]
        if spec["count"]:
            assert all(p.time == 0.0 for p in parse(answer, video_size=SIZE)[0].points)
    for spec in _specs("qa", 4):
        assert spec["messages"][1]["content"] == ("Yes." if spec["count"] else "No.")


def test_examples_are_reproducible_and_splits_differ():
    assert make_spec(CONFIG, "train", 5) == make_spec(CONFIG, "train", 5)
    assert make_spec(CONFIG, "train", 5) != make_spec(CONFIG, "validation", 5)


def test_tfds_files_read_back_and_pixels_match_the_answer(synthetic_root):
    train = data_source(dataset_dir(synthetic_root), TRAIN_SPLIT)
    assert len(train) == SMALL.num_train
    assert len(data_source(dataset_dir(synthetic_root), EVAL_SPLIT)) == SMALL.num_eval
    checked = 0
    for i in range(len(train)):
        record = train[i]
        truth = json.loads(record["truth"])
        if not len(record["images"]):
            assert len(record["video"]) > 0
            continue
        image = np.asarray(Image.open(io.BytesIO(record["images"][0])).convert("RGB"))
        for o in truth["objects"]:
            x, y = o["track"][0]
            if o["shape"] != "triangle":  # a triangle's centroid is inside, but near its thin top
                assert tuple(image[int(y), int(x)]) == COLORS[o["color"]]
                checked += 1
    assert checked > 0


def test_tokenizer_dir_loads_and_gives_a_model_config(synthetic_root):
    processor = Molmo2Processor.from_pretrained(synthetic_root / "tokenizer")
    tok = processor.tokenizer
    answer = make_spec(SMALL, "train", 1)["messages"][1]["content"]
    text = f"<|im_start|>user\nPoint.<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids, "no unknown pieces in the synthetic text"
    settings = model_token_settings(synthetic_root / "tokenizer")
    config = from_dict(Molmo2Config, {"text": settings["text"], "tokens": settings["tokens"],
                                      "vision": settings["vision"]}).validate()
    assert config.tokens.image_patch == tok.token_to_id("<im_patch>") >= config.text.vocab_size
    assert config.tokens.eos == (tok.token_to_id("<|im_end|>"),) and config.tokens.eos[0] < config.text.vocab_size
    assert config.text.embedding_rows > max(settings["tokens"][k] for k in ("video_prompt", "frame_end"))


def test_masks_are_the_drawn_pixels_of_each_object():
    from molmo2_jax.data.synthetic import BACKGROUNDS, make_example, render_frames
    from molmo2_jax.evaluation.masks import decode_rle

    checked = 0
    for index in range(12):
        spec = make_spec(CONFIG, "train", index)
        truth = json.loads(make_example(CONFIG, "train", index)["truth"])
        frames = render_frames(CONFIG, spec)
        assert len(truth["masks"]) == len(spec["objects"])
        for f, frame in enumerate(frames):
            masks = np.array([decode_rle(m[f]) for m in truth["masks"]], dtype=bool).reshape(-1, *frame.shape[:2])
            background = np.all(frame == BACKGROUNDS[spec["background"]], axis=-1)
            np.testing.assert_array_equal(masks.any(0), ~background)  # together: every drawn pixel, no other
            if not spec["video"]:  # images: objects do not overlap, so each mask holds its colour only
                for o, mask in zip(spec["objects"], masks):
                    assert mask.any() and np.all(frame[mask] == COLORS[o["color"]])
                    checked += 1
    assert checked > 0


@pytest.mark.parametrize("crop_size", [112, 130])
def test_a_crop_the_processor_cannot_tile_is_refused_before_writing(tmp_path, crop_size):
    from molmo2_jax.data.errors import DataError
    from molmo2_jax.data.tfds_builder import build_synthetic

    # 112 px is 8 patches, all of them inside the (4, 4) overlap margins; 130 px is not whole patches
    with pytest.raises(DataError, match=f"crop size {crop_size} px"):
        build_synthetic(tmp_path / "out", SMALL, crop_size=crop_size)
    assert list(tmp_path.iterdir()) == []


def test_cli_flags_reach_the_config_and_bad_values_fail_with_one_line(tmp_path, capsys):
    from molmo2_jax.cli import main

    out = tmp_path / "set"
    assert main(["build_synthetic", "--out", str(out), "--num-train", "20", "--num-eval", "4", "--image-size", "224",
                 "--crop-size", "224", "--object-size", "40", "44", "--max-distractors", "0",
                 "--vocab-size", "400"]) == 0
    written = SyntheticConfig.from_json((out / "synthetic_config.json").read_text())
    assert written.object_size == (40, 44) and written.max_distractors == 0
    sizes = [o["size"] for i in range(20) for o in make_spec(written, "train", i)["objects"]]
    assert sizes and all(40 <= s <= 44 for s in sizes)

    capsys.readouterr()
    assert main(["build_synthetic", "--out", str(tmp_path / "bad"), "--object-size", "50", "10"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "object_size" in err[0] and not (tmp_path / "bad").exists()


def test_reuse_keeps_a_set_built_with_the_same_settings_and_names_what_differs(tmp_path, capsys):
    from molmo2_jax.cli import main

    out = tmp_path / "set"
    args = ["build_synthetic", "--out", str(out), "--num-train", "12", "--num-eval", "4", "--image-size", "224",
            "--crop-size", "224", "--vocab-size", "400", "--reuse"]
    assert main(args) == 0
    marker = out / "kept"
    marker.write_text("")  # a rebuild would replace the whole directory

    assert main(args) == 0 and marker.exists()

    capsys.readouterr()
    assert main([*args, "--crop-size", "252"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crop_size 224 -> 252" in err[0] and marker.exists()

    assert main([*args, "--crop-size", "252", "--overwrite"]) == 0 and not marker.exists()
    assert json.loads((out / "build_settings.json").read_text())["crop_size"] == 252

    (out / "build_settings.json").unlink()  # as a set built before the settings file existed
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no build_settings.json" in err[0] and (out / "tokenizer").is_dir()
