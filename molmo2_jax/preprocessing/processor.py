"""`Molmo2Processor`: prompt + images / video -> the numpy inputs the transformers processor produces.

Same keys, dtypes, shapes and values as `transformers.Molmo2Processor(..., return_tensors="np",
padding=True)`: images and videos are flattened over the batch in prompt order, pooling indices
index the concatenated crops / frames of the whole call, texts are padded to the longest.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from molmo2_jax.batch import shift_pooling
from molmo2_jax.preprocessing.chat_template import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ChatTemplate,
    apply_chat_template,
    load_chat_template,
)
from molmo2_jax.preprocessing.errors import PromptError, TokenizerLoadError
from molmo2_jax.preprocessing.image import (
    ImageConfig,
    ImageInput,
    ProcessedImage,
    load_image,
    normalize,
    preprocess_image,
)
from molmo2_jax.preprocessing.tokenizer import Molmo2Tokenizer
from molmo2_jax.preprocessing.video import (
    DecodedVideo,
    ProcessedVideo,
    VideoConfig,
    decode_video,
    preprocess_frames,
    sample_indices,
)

VideoInput = str | os.PathLike | bytes | DecodedVideo | tuple | np.ndarray

# Token types the model attends to bidirectionally (mm_token_type_ids == 1).
MM_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>",
             "<frame_end>", "<im_low>")


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"cannot read {path}: {e}") from None


class Molmo2Processor:
    """Tokenizer + image / video preprocessing with the released token layout."""

    def __init__(
        self,
        tokenizer: Molmo2Tokenizer,
        image_config: ImageConfig = ImageConfig(),
        video_config: VideoConfig = VideoConfig(),
        *,
        image_use_col_tokens: bool = True,
        use_single_crop_col_tokens: bool | None = False,
        use_single_crop_start_token: bool = True,
        video_use_col_tokens: bool = False,
        use_frame_special_tokens: bool = True,
        chat_template: ChatTemplate | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # None: the built-in restatement of the released template
        self.image_config = image_config
        self.video_config = video_config
        self.image_use_col_tokens = image_use_col_tokens
        self.low_res_col_tokens = (
            image_use_col_tokens if use_single_crop_col_tokens is None else use_single_crop_col_tokens)
        self.low_res_start = "<low_res_im_start>" if use_single_crop_start_token else "<im_start>"
        self.video_use_col_tokens = video_use_col_tokens
        self.frame_start, self.frame_end = (
            ("<frame_start>", "<frame_end>") if use_frame_special_tokens else ("<im_start>", "<im_end>"))
        self.mm_token_ids = np.array([tokenizer.token_to_id(t) for t in MM_TOKENS], dtype=np.int64)
        self.video_token_id = tokenizer.token_to_id(VIDEO_PLACEHOLDER)
        self.bos_token = tokenizer.bos_token or tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Molmo2Processor:
        """Load tokenizer and processor settings from a checkpoint directory.

        Reads the released files (`preprocessor_config.json`, `video_preprocessor_config.json`,
        `processor_config.json`) or the single `processor_config.json` transformers 5 writes, and the
        chat template the directory ships (`chat_template.jinja` or a `chat_template` entry).
        """
        path = Path(path)
        if not path.is_dir():
            raise TokenizerLoadError(f"processor directory not found: {path}")
        proc = _json(path / "processor_config.json")
        image = _json(path / "preprocessor_config.json") or proc.get("image_processor", {})
        video = _json(path / "video_preprocessor_config.json") or proc.get("video_processor", {})
        flags = {k: proc[k] for k in ("image_use_col_tokens", "use_single_crop_col_tokens",
                                      "use_single_crop_start_token", "video_use_col_tokens",
                                      "use_frame_special_tokens") if k in proc}
        return cls(Molmo2Tokenizer.from_pretrained(path), ImageConfig.from_dict(image), VideoConfig.from_dict(video),
                   **flags, chat_template=load_chat_template(path))

    # ------------------------------------------------------------------------------------------
    # Placeholder expansion

    def image_string(self, grid: Sequence[int]) -> str:
        """Token string that replaces one `<|image|>`: low-res block, then the high-res block."""
        low_h, low_w, high_h, high_w = grid
        low_row = "<im_patch>" * low_w + ("<im_col>" if self.low_res_col_tokens else "")
        high_row = "<im_patch>" * high_w + ("<im_col>" if self.image_use_col_tokens else "")
        return f"{self.low_res_start}{low_row * low_h}<im_end><im_start>{high_row * high_h}<im_end>"

    def video_string(self, grid: Sequence[int], timestamps: Sequence[float]) -> str:
        """Token string that replaces one `<|video|>`: `"%.1f "` timestamp + wrapped patches per frame."""
        _, rows, cols = grid
        row = "<im_patch>" * cols + ("<im_col>" if self.video_use_col_tokens else "")
        frame = f"{self.frame_start}{row * rows}{self.frame_end}"
        return " ".join(f"{t:.1f} {frame}" for t in timestamps)

    # ------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """The checkpoint's chat template rendered as transformers renders it (the built-in restatement of
        the released one when the directory ships none); with `tokenize`, the ids, BOS first, instead."""
        if self.chat_template is None:
            prompt = apply_chat_template(messages, add_generation_prompt=add_generation_prompt, assistant_space=True)
        else:
            prompt = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return prompt
        return self.tokenizer.encode(prompt if prompt.startswith(self.bos_token) else self.bos_token + prompt)

    def _videos(self, videos: Sequence[VideoInput], cfg: VideoConfig, video_fps: float | None) -> list[ProcessedVideo]:
        out = []
        for i, video in enumerate(videos):
            if isinstance(video, DecodedVideo):
                frames, times = video.frames, video.timestamps
            elif isinstance(video, tuple) and len(video) == 2:
                frames, times = np.asarray(video[0]), np.asarray(video[1], dtype=np.float64)
            elif isinstance(video, np.ndarray):
                if video_fps is None:
                    raise PromptError(f"videos[{i}]: a frame array needs `video_fps` (or pass (frames, timestamps))")
                idx = sample_indices(len(video), video_fps, cfg.num_frames, cfg.max_fps)
                frames, times = video[idx], idx / video_fps
            else:
                decoded = decode_video(video, num_frames=cfg.num_frames, max_fps=cfg.max_fps, resize_to=cfg.size,
                                       name=None if isinstance(video, (str, os.PathLike)) else f"videos[{i}]")
                frames, times = decoded.frames, decoded.timestamps
            out.append(preprocess_frames(frames, times, cfg, name=f"videos[{i}]"))
        return out

    def __call__(
        self,
        text: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | None = None,
        videos: VideoInput | Sequence[VideoInput] | None = None,
        *,
        max_crops: int | None = None,
        num_frames: int | None = None,
        max_fps: float | None = None,
        video_fps: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Tokenize prompts with their media expanded; returns the reference's arrays (batch padded).

        `images`: paths, bytes, PIL images or arrays (a list, or per-prompt lists), consumed in
        placeholder order over the batch.
        `videos`: paths / bytes (decoded with the released sampling), `DecodedVideo`, `(frames,
        timestamps)` or a frame array with `video_fps`. `max_crops`, `num_frames`, `max_fps` override
        the checkpoint settings.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PromptError("text must be a string or a non-empty list of strings")
        image_list = _flatten(images)
        video_list = [] if videos is None else ([videos] if not isinstance(videos, list) else list(videos))

        n_image_slots = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        n_video_slots = [t.count(VIDEO_PLACEHOLDER) for t in texts]
        if n_image_slots != len(image_list):
            raise PromptError(f"the prompt has {n_image_slots} {IMAGE_PLACEHOLDER} placeholder(s) but "
                              f"{len(image_list)} image(s) were passed")
        if sum(n_video_slots) != len(video_list):
            raise PromptError(f"the prompt has {sum(n_video_slots)} {VIDEO_PLACEHOLDER} placeholder(s) but "
                              f"{len(video_list)} video(s) were passed")
        if any(n > 1 for n in n_video_slots):
            raise PromptError(f"at most one {VIDEO_PLACEHOLDER} per prompt is supported, got {max(n_video_slots)}")

        image_cfg = self.image_config if max_crops is None else replace(self.image_config, max_crops=max_crops)
        video_cfg = self.video_config
        if num_frames is not None or max_fps is not None:
            video_cfg = replace(video_cfg, num_frames=num_frames or video_cfg.num_frames,
                                max_fps=max_fps or video_cfg.max_fps)
        processed_images = [preprocess_image(load_image(img, name=None if isinstance(img, (str, os.PathLike))
                                                        else f"images[{i}]"), image_cfg)
                            for i, img in enumerate(image_list)]
        processed_videos = self._videos(video_list, video_cfg, video_fps)

        image_items, video_items = iter(processed_images), iter(processed_videos)
        pattern = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")
        prompts, media = [], []  # media: per prompt, its images and video in placeholder order

        def expand(match: re.Match) -> str:
            if match.group() == IMAGE_PLACEHOLDER:
                media[-1].append(item := next(image_items))
                return self.image_string(item.grid)
            media[-1].append(item := next(video_items))
            return self.video_string(item.grid, item.timestamps)

        for t in texts:
            media.append([])
            prompts.append(pattern.sub(expand, t if t.startswith(self.bos_token) else self.bos_token + t))
        out = self._tokenize(prompts)
        if processed_images:
            out.update(_stack_images(processed_images))
        if processed_videos:
            out.update(_stack_videos(processed_videos))
        if processed_images and processed_videos:
            out["video_patch_mask"] = self._video_patch_mask(out["input_ids"], media)
        return out

    def _video_patch_mask(self, input_ids: np.ndarray, media: list[list]) -> np.ndarray:
        """1 at the `<im_patch>` tokens of videos: each prompt's patch tokens belong to its media in order. Only
        calls with both images and videos need it (the transformers processor takes one kind at a time)."""
        mask = np.zeros_like(input_ids)
        patch_id = self.tokenizer.token_to_id("<im_patch>")
        for row, items in enumerate(media):
            flags = [np.full(len(m.pooling_idx), isinstance(m, ProcessedVideo)) for m in items]
            flags = np.concatenate(flags) if flags else np.zeros(0, bool)
            where = np.flatnonzero(input_ids[row] == patch_id)
            if len(where) != len(flags):
                raise PromptError(f"prompt {row} has {len(where)} <im_patch> tokens but its images and video give "
                                  f"{len(flags)}; the text must not contain <im_patch> itself")
            mask[row, where] = flags
        return mask

    def _tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode_batch(prompts)
        length = max(len(x) for x in ids)
        input_ids = np.full((len(ids), length), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for row, seq in enumerate(ids):
            sl = slice(length - len(seq), length) if self.tokenizer.padding_side == "left" else slice(0, len(seq))
            input_ids[row, sl] = seq
            mask[row, sl] = 1
        types = np.where(np.isin(input_ids, self.mm_token_ids), 1, 0)
        types[input_ids == self.video_token_id] = 2
        return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types.astype(np.int64)}


def _flatten(images: Any) -> list:
    """Images as one flat list: a single image, a list, or a list of per-prompt lists."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [img for item in images for img in (item if isinstance(item, (list, tuple)) else [item])]


def _pixels_and_pooling(items: list[ProcessedImage] | list[ProcessedVideo]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixels of all items (one pass over the uint8 patches) and their globally indexed pooling."""
    offsets = np.cumsum([0] + [p.patches.shape[0] * p.patches.shape[1] for p in items])
    patches = items[0].patches if len(items) == 1 else np.concatenate([p.patches for p in items])
    pooling = np.concatenate([shift_pooling(p.pooling_idx, int(o)) for p, o in zip(items, offsets)])
    return normalize(patches, items[0].config), pooling


def _stack_images(items: list[ProcessedImage]) -> dict[str, np.ndarray]:
    pixels, pooling = _pixels_and_pooling(items)
    return {
        "pixel_values": pixels,
        "image_token_pooling": pooling,
        "image_grids": np.array([p.grid for p in items], dtype=np.int64),
        "image_num_crops": np.array([p.num_crops for p in items], dtype=np.int64),
    }


def _stack_videos(items: list[ProcessedVideo]) -> dict[str, np.ndarray]:
    pixels, pooling = _pixels_and_pooling(items)
    return {
        "pixel_values_videos": pixels,
        "video_token_pooling": pooling,
        "video_grids": np.array([p.grid for p in items], dtype=np.int64),
    }
