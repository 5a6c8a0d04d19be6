"""Packing: a packed batch (images, a video whose frames are wrapped in `<im_start>`/`<im_end>` as in the released
4B/8B processor files, and text sharing rows) gives every example the logits the transformers reference gives it
alone; targets, weights, positions and segments stay inside each example."""

import numpy as np
import pytest
from ref_model import image_inputs, random_image, reference_logits, text_ids, video_inputs

import molmo2_jax
from molmo2_jax.data.errors import DataError
from molmo2_jax.data.packing import MODEL_KEYS, BatchBuilder, assemble, check_fits, fill_stats, vision_masks
from molmo2_jax.preprocessing.collate import Bucket

ATOL = 1e-4
BUCKETS = (Bucket(seq_len=512, max_crops=4, max_image_tokens=400, max_frames=4, max_video_tokens=324),
           Bucket(seq_len=768, max_crops=6, max_image_tokens=900, max_frames=4, max_video_tokens=324))


def _example(inputs: dict, name: str) -> dict:
    """A reference processor output as a packer example (loss weight 1 on every token)."""
    ids = inputs["input_ids"][0]
    ex = {"name": name, "input_ids": ids, "mm_token_type_ids": inputs["mm_token_type_ids"][0],
          "token_weights": np.ones(len(ids), np.float32)}
    for key in ("pixel_values", "image_token_pooling", "pixel_values_videos", "video_token_pooling"):
        if key in inputs:
            ex[key] = inputs[key]
    return ex


@pytest.fixture(scope="module")
def packed():
    inputs = [image_inputs([random_image(378, 378, 1)], seed=1), image_inputs([random_image(200, 100, 2)], seed=2),
              video_inputs(3, seed=3, frame_special_tokens=False),
              {"input_ids": np.asarray([text_ids(np.random.default_rng(4), 17)])}]
    inputs[3].update(attention_mask=np.ones_like(inputs[3]["input_ids"]),
                     mm_token_type_ids=np.zeros_like(inputs[3]["input_ids"]))
    builder = BatchBuilder(batch_size=2, capacity=BUCKETS[1])
    examples = [_example(x, f"ex{i}") for i, x in enumerate(inputs)]
    assert all(builder.add(ex) for ex in examples)
    batch = assemble(builder.rows, builder.smallest_bucket(BUCKETS), patches_per_crop=729, patch_dim=588)
    return inputs, examples, builder.rows, batch


def _slots(rows, name):
    for r, row in enumerate(rows):
        offset = 0
        for ex in row:
            if ex["name"] == name:
                return r, slice(offset, offset + len(ex["input_ids"]))
            offset += len(ex["input_ids"])
    raise KeyError(name)


def test_packed_batch_matches_each_example_alone(reference, packed):
    family, ref, path = reference
    inputs, examples, rows, batch = packed
    assert [len(r) for r in rows] == [3, 1], "image, video and text share the first row"
    model = molmo2_jax.load(path)
    logits = np.asarray(model({k: batch[k] for k in MODEL_KEYS}))
    for x, ex in zip(inputs, examples):
        r, sl = _slots(rows, ex["name"])
        expected = reference_logits(ref, x)[0]
        diff = float(np.max(np.abs(logits[r, sl] - expected)))
        assert diff <= ATOL, f"{family}/{ex['name']}: max |diff| {diff}"


def test_targets_positions_and_segments_stay_in_each_example(packed):
    inputs, examples, rows, batch = packed
    assert batch["input_ids"].shape == (2, 768) and batch["pixel_values"].shape == (2, 6, 729, 588)
    for r, row in enumerate(rows):
        for seg, ex in enumerate(row, start=1):
            _, sl = _slots(rows, ex["name"])
            n = len(ex["input_ids"])
            np.testing.assert_array_equal(batch["segment_ids"][r, sl], seg)
            np.testing.assert_array_equal(batch["position_ids"][r, sl], np.arange(n))
            np.testing.assert_array_equal(batch["target_ids"][r, sl][:-1], ex["input_ids"][1:])
            assert batch["loss_weights"][r, sl][-1] == 0 and np.all(batch["loss_weights"][r, sl][:-1] == 1)
    assert np.all(batch["loss_weights"][batch["segment_ids"] == 0] == 0)
    # each row holds its own examples' crops and frames; pooling rows index the row's crops, in the order of its
    # <im_patch> tokens (example 1, alone in row 1, keeps its own indices)
    n0, n1 = len(inputs[0]["image_token_pooling"]), len(inputs[1]["image_token_pooling"])
    np.testing.assert_array_equal(batch["pixel_values"][0, :2], inputs[0]["pixel_values"])
    np.testing.assert_array_equal(batch["pixel_values"][1, :2], inputs[1]["pixel_values"])
    np.testing.assert_array_equal(batch["image_token_pooling"][0, :n0], inputs[0]["image_token_pooling"])
    np.testing.assert_array_equal(batch["image_token_pooling"][1, :n1], inputs[1]["image_token_pooling"])
    np.testing.assert_array_equal(batch["video_token_pooling"][0, :len(inputs[2]["video_token_pooling"])],
                                  inputs[2]["video_token_pooling"])
    assert (batch["image_token_pooling"][:, max(n0, n1):] == -1).all() and (batch["video_token_pooling"][1] == -1).all()
    masks = vision_masks(batch)
    assert masks["crop_mask"].tolist() == [[True] * 2 + [False] * 4] * 2
    assert masks["frame_mask"].tolist() == [[True] * 3 + [False], [False] * 4]
    assert set(batch) == set(MODEL_KEYS) | {"target_ids", "loss_weights"}
    stats = fill_stats(batch)
    assert stats["crop_share"] == 4 / 12 and stats["frame_share"] == 3 / 8 and stats["examples"] == 4
    assert stats["token_share"] == pytest.approx(sum(len(e["input_ids"]) for e in examples) / (2 * 768))


def test_small_batch_takes_the_smallest_bucket_and_oversize_is_named():
    ex = _example({"input_ids": np.ones((1, 30), np.int64), "mm_token_type_ids": np.zeros((1, 30), np.int64)}, "a")
    builder = BatchBuilder(batch_size=2, capacity=BUCKETS[1])
    assert builder.add(ex)
    assert builder.smallest_bucket(BUCKETS) == BUCKETS[0]
    long = dict(ex, name="long.jsonl:3", input_ids=np.ones(800, np.int32))
    with pytest.raises(DataError, match=r"long.jsonl:3: needs seq_len=800 but the largest bucket allows 768"):
        check_fits(long, BUCKETS[1])


def test_vision_budgets_are_per_row():
    """An example whose crops do not fit the first row's budget goes to the next row, though its tokens would fit."""
    def image_example(name, crops):
        ids = np.ones(10, np.int32)
        return {"name": name, "input_ids": ids, "mm_token_type_ids": np.zeros(10, np.int32),
                "token_weights": np.ones(10, np.float32), "pixel_values": np.zeros((crops, 4, 3), np.float32),
                "image_token_pooling": np.zeros((0, 4), np.int32)}
    capacity = Bucket(seq_len=64, max_crops=4, max_image_tokens=8, max_frames=0, max_video_tokens=0)
    builder = BatchBuilder(batch_size=2, capacity=capacity)
    assert builder.add(image_example("a", 3)) and builder.add(image_example("b", 3))
    assert builder.add(image_example("c", 1)) and not builder.add(image_example("d", 2))
    assert [[ex["name"] for ex in row] for row in builder.rows] == [["a", "c"], ["b"]]
