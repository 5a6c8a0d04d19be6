"""Logits, ViT features and pooled visual tokens against the transformers reference (float32, highest
precision), for a Qwen3-style and an Olmo3-style tiny model, loaded from `save_pretrained` output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ref_model import IM_PATCH, collated, image_inputs, random_image, reference_logits, text_ids, video_inputs

import molmo2_jax
from molmo2_jax.api import InputError
from molmo2_jax.batch import to_rows

ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded(reference):
    family, ref, path = reference
    return family, ref, molmo2_jax.load(path)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


CASES = {
    "text": lambda: {"input_ids": np.asarray([text_ids(np.random.default_rng(1), 17)])},
    "image_multicrop": lambda: image_inputs([random_image(640, 480)]),  # 2x2 tiling + global crop
    "two_images": lambda: image_inputs([random_image(378, 378, 1), random_image(90, 700, 2)]),
    "video": lambda: video_inputs(4),
    # the released Molmo2-4B/8B processor files wrap frames in <im_start>/<im_end>, like images
    "video_im_start": lambda: video_inputs(4, frame_special_tokens=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(loaded, case):
    family, ref, model = loaded
    inputs = CASES[case]()
    expected = reference_logits(ref, inputs)
    got = np.asarray(model(inputs))
    assert got.shape == expected.shape
    assert _max_diff(got, expected) <= ATOL, f"{family}/{case}: max |diff| {_max_diff(got, expected)}"


def test_vit_and_pooled_features_match_reference(loaded):
    family, ref, model = loaded
    inputs = image_inputs([random_image(500, 300)])
    pixels = torch.from_numpy(inputs["pixel_values"])
    with torch.no_grad():
        hidden = ref.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        layers = ref.config.adapter_config.vision_feature_layer
        expected_vit = torch.cat([hidden[layer + 1 if layer >= 0 else layer] for layer in layers], -1).numpy()
        expected_pooled = ref.model.get_image_features(
            pixels, torch.from_numpy(inputs["image_token_pooling"]),
            torch.from_numpy(inputs["image_grids"])).pooler_output
        expected_pooled = torch.cat(expected_pooled).numpy()
    got_vit = model.apply(jnp.asarray(inputs["pixel_values"]), method="vit_features")
    assert _max_diff(got_vit, expected_vit) <= ATOL
    (tokens, keep), _ = model.apply(jnp.asarray(inputs["pixel_values"])[None],  # one row
                                    jnp.asarray(inputs["image_token_pooling"])[None], method="visual_tokens")
    assert bool(np.all(keep))
    assert _max_diff(tokens[0], expected_pooled) <= ATOL


def test_padding_to_static_buckets_changes_nothing(loaded):
    """Extra zero crops, -1 pooling rows and right padding of the sequence leave the real logits unchanged."""
    family, ref, model = loaded
    inputs = image_inputs([random_image(400, 300)])
    base = np.asarray(model(inputs))
    t = inputs["input_ids"].shape[1]
    padded = to_rows(inputs, IM_PATCH)
    padded["pixel_values"] = np.concatenate([padded["pixel_values"], np.zeros((1, 3, 729, 588), np.float32)], 1)
    padded["image_token_pooling"] = np.concatenate([padded["image_token_pooling"],
                                                    -np.ones((1, 7, 4), inputs["image_token_pooling"].dtype)], 1)
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        padded[key] = np.concatenate([inputs[key], np.full((1, 9), fill, inputs[key].dtype)], axis=1)
    out = np.asarray(model(padded))
    assert np.isfinite(out).all()
    assert _max_diff(out[:, :t], base) <= 1e-5


def test_batch_with_left_padding_matches_reference(loaded):
    """Two sequences of different lengths, left padded, with the reference given the same positions."""
    family, ref, model = loaded
    rng = np.random.default_rng(3)
    long, short = text_ids(rng, 12), text_ids(rng, 7)
    ids = np.asarray([long, [0] * 5 + short])
    mask = np.asarray([[1] * 12, [0] * 5 + [1] * 7])
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    expected = reference_logits(ref, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    got = np.asarray(model({"input_ids": ids, "attention_mask": mask}))
    assert _max_diff(got[mask == 1], expected[mask == 1]) <= ATOL


def test_bfloat16_agrees_with_float32_reference(reference):
    family, ref, path = reference
    inputs = image_inputs([random_image(640, 480)])
    expected = reference_logits(ref, inputs)
    got = np.asarray(molmo2_jax.load(path, dtype="bfloat16")(inputs), np.float64)
    log_p = jax.nn.log_softmax(expected.astype(np.float64), -1)
    log_q = jax.nn.log_softmax(got, -1)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1)))
    print(f"{family} bfloat16 vs float32 reference: mean KL {kl:.2e}")
    assert kl < 1e-3


@pytest.mark.parametrize("frame_special_tokens", [True, False])
def test_image_row_and_video_row_in_one_batch(loaded, frame_special_tokens):
    """A batch of an image row and a video row (collated, left padded) gives each row the reference's logits of
    that row alone; `video_patch_mask` tells the video's patches from the image's whatever wraps the frames."""
    family, ref, model = loaded
    rows = [image_inputs([random_image(500, 300, 4)], seed=4), video_inputs(3, 5, frame_special_tokens)]
    batch = {k: v for k, v in collated(rows, "left").items() if not k.endswith(("_grids", "_num_crops"))}
    got = np.asarray(model(batch))
    for r, inputs in enumerate(rows):
        real = batch["attention_mask"][r] == 1
        diff = _max_diff(got[r][real], reference_logits(ref, inputs)[0])
        assert diff <= ATOL, f"{family}/row {r}: max |diff| {diff}"

    with pytest.raises(InputError, match="both image and video features need `video_patch_mask`"):
        model({k: v for k, v in batch.items() if k != "video_patch_mask"})
    one_short = dict(batch, video_patch_mask=batch["video_patch_mask"].copy())
    one_short["video_patch_mask"][1, np.flatnonzero(batch["input_ids"][1] == IM_PATCH)[0]] = 0
    with pytest.raises(InputError, match=r"^\d+ image <im_patch> tokens but \d+ image feature rows"):
        model(one_short)
