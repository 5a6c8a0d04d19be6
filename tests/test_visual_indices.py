"""Per-row (batch-local) visual indices against the batch-global ones they replaced: a model whose crops, pooling
indices and `<im_patch>` ranks span the whole batch (the oracle, below) gives the same logits and gradients as
the per-row model on the same batch, in float32, for both decoder families; `batch.to_rows` moves the transformers
layout into rows; bad per-row inputs fail in one line naming the input."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import gradient_diff, multimodal_example, olmo3, rel_diff

from molmo2_jax.batch import InputError, check_rows, shift_pooling, to_rows
from molmo2_jax.config import load_preset
from molmo2_jax.data.packing import MODEL_KEYS, assemble
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.params import flatten
from molmo2_jax.preprocessing.collate import Bucket

RTOL = 1e-5  # max |per-row - global| / max |global|, per array
P = 729


class GlobalIndices(Molmo2):
    """The batch-global path: every row's crops in one vision batch `[1, crops, ...]`, pooling indices into their
    concatenation `[1, tokens, K]`, and each stream's `<im_patch>` tokens ranked over the flattened batch (the
    batch seen as one long row), as the model did before its indices became per row."""

    def embed(self, input_ids, image_stream=None, video_stream=None, video_patch_mask=None):
        b, t = input_ids.shape
        one_row = lambda a: None if a is None else a.reshape(1, b * t)  # noqa: E731
        x = super().embed(one_row(input_ids), image_stream, video_stream, one_row(video_patch_mask))
        return x.reshape(b, t, -1)


def packed_batch(config) -> dict[str, np.ndarray]:
    """Four rows of 48 tokens: two images in one example; a video then a packed image example; two packed image
    examples; text only. Every row is padded (tokens, crops, frames and pooled tokens)."""
    rng, tok = np.random.default_rng(0), config.tokens
    example = functools.partial(multimodal_example, empty_slots=True)
    rows = [
        [example(rng, tok, [("text", 3), ("image", 8), ("text", 2), ("image", 6), ("text", 5)])],
        [example(rng, tok, [("text", 2), ("frame", 4), ("text", 2), ("frame", 4), ("text", 2)]),
         example(rng, tok, [("text", 2), ("image", 5), ("text", 4)])],
        [example(rng, tok, [("text", 4), ("image", 7), ("text", 6)]),
         example(rng, tok, [("text", 2), ("image", 9), ("text", 3)])],
        [example(rng, tok, [("text", 20)])],
    ]
    bucket = Bucket(seq_len=48, max_crops=3, max_image_tokens=20, max_frames=3, max_video_tokens=10)
    batch = assemble(rows, bucket, patches_per_crop=P, patch_dim=588, pad_token_id=tok.pad)
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def to_global(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row visual arrays as one batch-global vision batch: crops concatenated row after row, pooling rows
    likewise with their indices shifted past the crops of the rows before (the transformers layout)."""
    out = dict(batch)
    for pixels_key, pooling_key in (("pixel_values", "image_token_pooling"),
                                    ("pixel_values_videos", "video_token_pooling")):
        pixels, pooling = batch[pixels_key], batch[pooling_key]
        out[pixels_key] = pixels.reshape(-1, *pixels.shape[2:])
        offsets = np.arange(len(pixels))[:, None, None] * pixels.shape[1] * P
        out[pooling_key] = shift_pooling(pooling, offsets).reshape(-1, pooling.shape[-1])
    return out


def _loss_and_grads(module, params, inputs, weights, mask):
    def loss(p):
        logits, _ = module.apply({"params": p}, **inputs)
        return jnp.sum(logits * weights * mask[..., None]), logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("family", ["qwen3", "olmo3"])
def test_per_row_equals_global_indices(family):
    """Logits and the gradient of every parameter: per-row indices vs the batch-global path."""
    config = load_preset("tiny")
    config = olmo3(config) if family == "olmo3" else config
    rows = packed_batch(config)
    flat = to_global(rows)
    one_vision_batch = {k: (v[None] if k.startswith(("pixel_values", "image_token", "video_token")) else v)
                        for k, v in flat.items()}
    rows, one_vision_batch = ({k: jnp.asarray(v) for k, v in b.items()} for b in (rows, one_vision_batch))
    params = Molmo2(config).init(jax.random.key(0), **rows)["params"]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*rows["input_ids"].shape, config.text.vocab_size)),
                          jnp.float32)
    mask = rows["attention_mask"]
    g_rows, l_rows = _loss_and_grads(Molmo2(config), params, rows, weights, mask)
    g_global, l_global = _loss_and_grads(GlobalIndices(config), params, one_vision_batch, weights, mask)
    real = np.asarray(mask) > 0
    assert rel_diff(np.asarray(l_rows)[real], np.asarray(l_global)[real]) <= RTOL
    flat_rows, flat_global = flatten(nn.unbox(g_rows)), flatten(nn.unbox(g_global))
    assert set(flat_rows) == set(flat_global)
    for path in flat_global:
        assert float(np.max(np.abs(flat_global[path]))) > 0, f"{path}: zero gradient, the test would not see it"
        assert gradient_diff(path, flat_rows, flat_global) <= RTOL, path


def test_transformers_layout_moves_into_rows():
    """`to_rows` on the global layout gives back each row's own crops, frames and pooling (its padding crops and
    all -1 rows dropped), and the model takes either layout at its edge."""
    config = load_preset("tiny")
    rows = packed_batch(config)
    moved = to_rows(to_global(rows), config.tokens.image_patch)
    check_rows(moved, config.tokens.image_patch)
    for pixels_key, pooling_key in (("pixel_values", "image_token_pooling"),
                                    ("pixel_values_videos", "video_token_pooling")):
        for r in range(len(rows["input_ids"])):
            kept = rows[pooling_key][r][np.any(rows[pooling_key][r] >= 0, axis=-1)]
            got = moved[pooling_key][r]
            np.testing.assert_array_equal(got[len(kept):], -1)
            if len(kept):  # the crops this row reads, first to last, re-indexed to them
                first = kept[kept >= 0].min() // P
                np.testing.assert_array_equal(got[: len(kept)], shift_pooling(kept, -first * P))
                last = kept.max() // P + 1
                np.testing.assert_array_equal(moved[pixels_key][r, : last - first], rows[pixels_key][r, first:last])
            else:
                assert not moved[pixels_key][r].any()
    again = to_rows(moved, config.tokens.image_patch)  # already per row: unchanged
    assert all(again[k] is moved[k] for k in moved)


def test_bad_per_row_inputs_are_named():
    config = load_preset("tiny")
    patch = config.tokens.image_patch
    rows = packed_batch(config)
    short = dict(rows, image_token_pooling=rows["image_token_pooling"].copy())
    short["image_token_pooling"][2, 0] = -1  # row 2 loses a pooled token its <im_patch> tokens need
    with pytest.raises(InputError, match=r"^row 2: 16 image <im_patch> tokens but 15 image feature rows"):
        check_rows(short, patch)
    far = dict(rows, video_token_pooling=rows["video_token_pooling"].copy())
    far["video_token_pooling"][1, 0, 0] = 3 * P  # past row 1's three frames
    with pytest.raises(InputError, match=r"^row 1: video_token_pooling reads patch 2187 but a row of "
                                         r"pixel_values_videos holds 2187 patches \(3 crops\)"):
        check_rows(far, patch)
    with pytest.raises(InputError, match=r"^image_token_pooling has shape \(3, 20, 4\); expected \[batch=4"):
        check_rows(dict(rows, image_token_pooling=rows["image_token_pooling"][:3]), patch)
    flat = to_global(rows)
    with pytest.raises(InputError, match=r"^image_token_pooling \(\d+, 4\) indexes the whole batch's crops, so "
                                         r"pixel_values must be \[crops, patches, values\]"):
        to_rows(dict(flat, pixel_values=rows["pixel_values"]), patch)
    with pytest.raises(InputError, match=r"^image_token_pooling reads patch \d+ but pixel_values holds 729 patches"):
        to_rows(dict(flat, pixel_values=flat["pixel_values"][:1]), patch)
