"""Tiny random reference models (transformers Molmo2ForConditionalGeneration) saved in the released layout,
and model inputs built with the reference image/video processors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Molmo2Config, Molmo2ForConditionalGeneration, Molmo2ImageProcessor, Molmo2VideoProcessor

from molmo2_jax.preprocessing import collate

# Token ids of the tiny models: base vocabulary 300, the ten Molmo2 tokens right after it.
VOCAB = 300
IM_START, IM_END, IM_PATCH, IM_COL, LOW_RES_START = 300, 301, 302, 303, 304
FRAME_START, FRAME_END = 307, 308
MM_IDS = (IM_START, IM_END, IM_PATCH, IM_COL, LOW_RES_START, 306, FRAME_START, FRAME_END)


def tiny_config(family: str = "qwen3", **text_overrides) -> Molmo2Config:
    """Qwen3 style (pre-norm, GQA, per-head qk-norm) or Olmo3 style (post-norm, MHA, full-width qk-norm,
    YaRN on a subset of layers)."""
    text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                additional_vocab_size=16, num_hidden_layers=3, intermediate_size=96,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "olmo3":
        text.update(num_key_value_heads=4, qk_norm_type="olmo", norm_after=True, rope_scaling_layers=[0, 2],
                    rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                                     "attention_factor": 1.2079441541679836, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "original_max_position_embeddings": 64})
    text.update(text_overrides)
    return Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8),
        adapter_config=dict(vision_feature_layer=[-1, -3], hidden_size=32, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=8, intermediate_size=48, text_hidden_size=64),
        text_config=text, image_start_token_id=IM_START, image_end_token_id=IM_END, image_patch_id=IM_PATCH,
        low_res_image_start_token_id=LOW_RES_START, frame_start_token_id=FRAME_START,
        frame_end_token_id=FRAME_END)


def make_reference(path: Path, family: str = "qwen3", seed: int = 0) -> Molmo2ForConditionalGeneration:
    """A random reference model saved with `save_pretrained` (released tensor names) at `path`."""
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(tiny_config(family)).eval()
    with torch.no_grad():  # random norm weights, so a mix-up of norms cannot hide behind all-ones
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def enliven(model) -> None:
    """Re-initialise a tiny reference model so its greedy output depends on its input: the default 0.02 init
    makes almost every prompt decode to one repeated token. Decoder and connector matrices get 2/sqrt(fan_in)
    scale, embeddings unit scale."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "vision" not in name:
                std = 1.0 if "embed" in name else 2.0 * p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def lively_reference(path: Path, family: str):
    """An `enliven`ed tiny reference model, saved (released layout) at `path`."""
    model = make_reference(path, family)
    enliven(model)
    model.save_pretrained(path)
    return model


def tokenizer_checkpoint(path: Path) -> Molmo2ForConditionalGeneration:
    """An `enliven`ed tiny Qwen3-style reference model whose token ids match the test tokenizer, saved at `path`
    with that tokenizer and the released processor files (a directory both processors and `load` read)."""
    from ref_tokenizer import CONFIG_TOKEN_IDS, make_tokenizer_dir

    ids = CONFIG_TOKEN_IDS["qwen3"]
    config = tiny_config("qwen3", vocab_size=ids["vocab_size"], additional_vocab_size=ids["additional_vocab_size"])
    for key, value in ids.items():
        if key not in ("vocab_size", "additional_vocab_size"):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = Molmo2ForConditionalGeneration(config).eval()
    enliven(model)
    model.save_pretrained(path)
    make_tokenizer_dir(path, "qwen3")
    return model


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def text_ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1, VOCAB, n).tolist()


def image_inputs(images: list[Image.Image], seed: int = 0, text_after: int = 2) -> dict[str, np.ndarray]:
    """One sequence with each image's token block (released layout) between random text tokens (3 before the
    first image, `text_after` after each)."""
    processed = Molmo2ImageProcessor()(images=images, return_tensors="np")
    rng = np.random.default_rng(seed)
    ids = text_ids(rng, 3)
    for grid in processed["image_grids"]:
        low_h, low_w, rows, cols = (int(x) for x in grid)
        ids += [LOW_RES_START] + [IM_PATCH] * (low_h * low_w) + [IM_END]
        ids += [IM_START] + ([IM_PATCH] * cols + [IM_COL]) * rows + [IM_END]
        ids += text_ids(rng, text_after)
    return _with_masks(ids, {k: np.asarray(v) for k, v in processed.items()})


def video_inputs(num_frames: int, seed: int = 0, frame_special_tokens: bool = True) -> dict[str, np.ndarray]:
    """One video with each frame wrapped in `<frame_start>`/`<frame_end>`, or, as the released Molmo2-4B/8B
    processor files say (`use_frame_special_tokens: false`), in `<im_start>`/`<im_end>` like an image."""
    start, end = (FRAME_START, FRAME_END) if frame_special_tokens else (IM_START, IM_END)
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (num_frames, 48, 64, 3), dtype=np.uint8)
    processor = Molmo2VideoProcessor(do_rescale=True, do_normalize=True)  # as the released files say (to [-1, 1])
    processed = processor(videos=[frames], do_sample_frames=False, fps=2.0, return_tensors="np")
    ids = text_ids(rng, 3)
    n, rows, cols = (int(x) for x in processed["video_grids"][0])
    for _ in range(n):
        ids += text_ids(rng, 2) + [start] + [IM_PATCH] * (rows * cols) + [end]
    ids += text_ids(rng, 4)
    return _with_masks(ids, {k: np.asarray(v) for k, v in processed.items()})


def _with_masks(ids: list[int], extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    input_ids = np.asarray([ids], np.int64)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
            "mm_token_type_ids": np.isin(input_ids, MM_IDS).astype(np.int64), **extra}


def collated(examples: list[dict[str, np.ndarray]], padding_side: str = "right") -> dict[str, np.ndarray]:
    """One-sequence inputs -> one batch by our `collate` at their exact visual sizes (the reference cannot skip
    padded crops or pooling rows): sequences padded with id 0 (attention_mask 0), crops concatenated, pooling
    indices global."""
    total = lambda key: sum(ex[key].shape[0] for ex in examples if key in ex)
    return collate(examples, seq_len=max(ex["input_ids"].shape[1] for ex in examples),
                   max_crops=total("pixel_values"), max_image_tokens=total("image_token_pooling"),
                   max_frames=total("pixel_values_videos"), max_video_tokens=total("video_token_pooling"),
                   pad_token_id=0, padding_side=padding_side)


def for_reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` without visual arrays that have no rows and without our `video_patch_mask` (the reference wants
    them absent; it takes one visual stream at a time)."""
    return {k: v for k, v in inputs.items()
            if k != "video_patch_mask" and (k == "input_ids" or np.shape(v)[:1] != (0,))}


def padded_batch(examples: list[dict[str, np.ndarray]], padding_side: str = "right") -> dict[str, np.ndarray]:
    """`collated` examples as the reference takes them."""
    return for_reference(collated(examples, padding_side))


def reference_logits(model: Molmo2ForConditionalGeneration, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    return out.logits.float().numpy()
