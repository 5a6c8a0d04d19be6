"""A small sentencepiece tokenizer for a dataset's own text, saved as a Molmo2 processor directory.

The chat tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) are user-defined symbols of the
sentencepiece model, so the model's head can emit them; the ten Molmo2 tokens are appended after the
sentencepiece vocabulary as added tokens, exactly like the released checkpoints keep them in the extra
input-embedding rows the head cannot emit. The directory loads with
`molmo2_jax.preprocessing.Molmo2Processor.from_pretrained`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from molmo2_jax.preprocessing.tokenizer import MOLMO2_SPECIAL_TOKENS

CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MODEL_FILE = "tokenizer.model"
# TokenIds field -> token string (the fields of molmo2_jax.config.TokenIds).
TOKEN_FIELDS = {
    "image_start": "<im_start>", "image_end": "<im_end>", "image_patch": "<im_patch>", "image_col": "<im_col>",
    "low_res_image_start": "<low_res_im_start>", "image_prompt": "<|image|>", "image_low_res": "<im_low>",
    "frame_start": "<frame_start>", "frame_end": "<frame_end>", "video_prompt": "<|video|>",
}


class TokenizerTrainingError(ValueError):
    """The text given to train a tokenizer cannot produce the requested vocabulary."""


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 640, model_type: str = "bpe") -> bytes:
    """Train a sentencepiece model on `texts` and return its serialized bytes.

    Identity normalisation keeps newlines and spaces exactly; digits are split so every coordinate is
    written digit by digit; unseen characters fall back to bytes.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise TokenizerTrainingError("train_sentencepiece: no text to train on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            user_defined_symbols=[*CHAT_TOKENS, "\n"], split_digits=True, byte_fallback=True,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False,
            max_sentence_length=1 << 16, minloglevel=2, num_threads=1)
    except RuntimeError as e:
        raise TokenizerTrainingError(f"sentencepiece training failed: {e}") from None
    return model.getvalue()


def processor_files(crop_size: int = 378, max_crops: int = 8, num_frames: int = 384, max_fps: float = 2.0,
                    overlap_margins: tuple[int, int] = (4, 4)) -> dict[str, dict[str, Any]]:
    """The released (Molmo2-4B/8B) processor config files, with the crop size and limits given."""
    common = {"do_convert_rgb": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "patch_size": 14,
              "resample": 2, "size": {"height": crop_size, "width": crop_size}, "processor_class": "Molmo2Processor"}
    return {
        "preprocessor_config.json": {**common, "image_processor_type": "Molmo2ImageProcessor", "max_crops": max_crops,
                                     "overlap_margins": list(overlap_margins), "pooling_size": [2, 2]},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Molmo2VideoProcessor",
                                           "frame_sample_mode": "uniform_last_frame", "num_frames": num_frames,
                                           "max_fps": max_fps, "sampling_fps": 2, "pooling_size": [3, 3],
                                           "do_sample_frames": True},
        "processor_config.json": {"processor_class": "Molmo2Processor", "image_use_col_tokens": True,
                                  "use_single_crop_col_tokens": False, "use_single_crop_start_token": True,
                                  "video_use_col_tokens": False, "use_frame_special_tokens": False},
    }


def write_tokenizer_dir(model_bytes: bytes, out_dir: str | Path, **processor_settings: Any) -> Path:
    """Write the sentencepiece model, tokenizer configs (Molmo2 tokens appended after its vocabulary) and the
    processor configs to `out_dir`. `processor_settings` go to `processor_files`."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    base = sp.get_piece_size()
    added = {tok: sp.piece_to_id(tok) for tok in CHAT_TOKENS}
    added.update({tok: base + i for i, tok in enumerate(MOLMO2_SPECIAL_TOKENS)})
    roles = {"bos_token": "<|im_end|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    config = {**roles, "padding_side": "right", "model_max_length": 1_000_000, "tokenizer_class": "Molmo2SentencePiece",
              "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in added.items()}}
    files = {"tokenizer_config.json": config, "special_tokens_map.json": roles,
             "added_tokens.json": added, **processor_files(**processor_settings)}
    (out / MODEL_FILE).write_bytes(model_bytes)
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def model_token_settings(tokenizer_dir: str | Path) -> dict[str, Any]:
    """Vocabulary sizes and special-token ids for a model using this tokenizer directory.

    Returns `{"text": {"vocab_size", "additional_vocab_size"}, "tokens": {TokenIds fields}, "vision":
    {"image_size"}}`, ready for `Molmo2Config` overrides (`from_dict`) of a model trained from scratch.
    """
    from molmo2_jax.preprocessing.tokenizer import Molmo2Tokenizer

    directory = Path(tokenizer_dir)
    tok = Molmo2Tokenizer.from_pretrained(directory)
    ids = {field: tok.token_to_id(token) for field, token in TOKEN_FIELDS.items()}
    vocab_size = min(ids.values())  # the Molmo2 tokens follow the base vocabulary
    crop = json.loads((directory / "preprocessor_config.json").read_text())["size"]["height"]
    return {
        "text": {"vocab_size": vocab_size, "additional_vocab_size": max(ids.values()) + 1 - vocab_size},
        "tokens": {**ids, "bos": tok.bos_token_id, "eos": [tok.eos_token_id], "pad": tok.pad_token_id},
        "vision": {"image_size": int(crop)},
    }
