"""Tiny Molmo2-style tokenizer and processor directories for tests.

`make_tokenizer_dir` writes a byte-level BPE `tokenizer.json` (every string is encodable) whose
vocabulary holds the chat tokens and the ten Molmo2 special tokens at fixed small ids, plus the
processor files the transformers `Molmo2Processor` saves. Both our processor and the reference
read the same files. Tiny model configs take their token ids from `TOKEN_IDS` / `CONFIG_TOKEN_IDS`.

Layout (both families): ids 0..255 bytes, 256.. chat tokens, then `extra_words` up to
`EXTRA_WORDS_END`, unused filler up to `VOCAB_SIZE`, then the Molmo2 tokens from `VOCAB_SIZE` on
(in the released order), `ADDITIONAL_VOCAB_SIZE` rows of extra embeddings in all.
"""

from __future__ import annotations

import json
from pathlib import Path

from molmo2_jax.preprocessing.chat_template import DEMO_STYLES as TEMPLATE_DEMO_STYLES

VOCAB_SIZE = 320  # base vocabulary (lm_head rows)
ADDITIONAL_VOCAB_SIZE = 16  # extra input-embedding rows; Molmo2 tokens live here
MOLMO2_TOKENS = [
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>",
    "<|image|>", "<im_low>", "<frame_start>", "<frame_end>", "<|video|>",
]
CHAT_TOKENS = {
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "olmo3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
}
# bos / eos / pad strings, as in the released tokenizer configs (O-7B: see spec section 9).
ROLE_TOKENS = {
    "qwen3": {"bos_token": "<|im_end|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "olmo3": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"},
}
EXTRA_WORDS_START = 260
EXTRA_WORDS_END = VOCAB_SIZE


def _token_ids(family: str) -> dict[str, int]:
    ids = {tok: 256 + i for i, tok in enumerate(CHAT_TOKENS[family])}
    ids.update({tok: VOCAB_SIZE + i for i, tok in enumerate(MOLMO2_TOKENS)})
    return ids


TOKEN_IDS: dict[str, dict[str, int]] = {family: _token_ids(family) for family in CHAT_TOKENS}
"""Token string -> id, per family ("qwen3", "olmo3")."""


def _config_ids(family: str) -> dict[str, int]:
    ids = TOKEN_IDS[family]
    roles = ROLE_TOKENS[family]
    return {
        "vocab_size": VOCAB_SIZE,
        "additional_vocab_size": ADDITIONAL_VOCAB_SIZE,
        "bos_token_id": ids[roles["bos_token"]],
        "eos_token_id": ids[roles["eos_token"]],
        "pad_token_id": ids[roles["pad_token"]],
        "image_start_token_id": ids["<im_start>"],
        "low_res_image_start_token_id": ids["<low_res_im_start>"],
        "image_end_token_id": ids["<im_end>"],
        "image_patch_id": ids["<im_patch>"],
        "image_col_id": ids["<im_col>"],
        "image_low_res_id": ids["<im_low>"],
        "frame_start_token_id": ids["<frame_start>"],
        "frame_end_token_id": ids["<frame_end>"],
        # prompt placeholders (not config fields: in Molmo2Config `image_token_id` aliases image_patch_id)
        "image_placeholder_id": ids["<|image|>"],
        "video_placeholder_id": ids["<|video|>"],
    }


CONFIG_TOKEN_IDS: dict[str, dict[str, int]] = {family: _config_ids(family) for family in CHAT_TOKENS}
"""Model-config field name -> id (names as in the released `config.json`), per family."""

# A Jinja rendering of the released Molmo2 chat template's behaviour (written for these tests):
# media placeholders first ("Image N" labels when several images), then an optional subtitle
# message, then alternating user/assistant turns; later user turns reopen with "<|im_end|>\n".
DEMO_STYLES = sorted(TEMPLATE_DEMO_STYLES)  # the style list is data; the template logic below is the test's own
CHAT_TEMPLATE = (
    "{%- set styles = " + json.dumps(DEMO_STYLES) + " -%}"
    "{%- set n = namespace(images=0, videos=0) -%}"
    "{%- set sub = messages and messages[0]['role'].lower() == 'subtitle' -%}"
    "{%- for msg in messages if msg['content'] is not string -%}"
    "{%- for part in msg['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set n.images = n.images + 1 -%}"
    "{%- elif part['type'] == 'video' or 'video' in part or 'video_url' in part -%}"
    "{%- set n.videos = n.videos + 1 -%}"
    "{%- endif -%}{%- endfor -%}{%- endfor -%}"
    "{%- if n.images == 1 -%}<|image|>"
    "{%- else -%}{%- for i in range(n.images) -%}Image {{ i + 1 }}<|image|>{%- endfor -%}{%- endif -%}"
    "{%- for i in range(n.videos) -%}<|video|>{%- endfor -%}"
    "{%- if sub -%}{{ messages[0]['content'] }}{%- endif -%}"
    "{%- set turns = messages[1:] if sub else messages -%}"
    "{%- for msg in turns -%}"
    "{%- set role = msg['role'].lower() -%}"
    "{%- if role != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if msg['content'] is string -%}{%- set text = msg['content'] -%}"
    "{%- else -%}{%- set acc = namespace(parts=[]) -%}"
    "{%- for part in msg['content'] if part['type'] == 'text' -%}"
    "{%- if part['style'] is defined and part['style'] not in styles -%}"
    "{%- set acc.parts = acc.parts + [part['style'] ~ ': ' ~ part['text']] -%}"
    "{%- else -%}{%- set acc.parts = acc.parts + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = acc.parts | join(' ') -%}{%- endif -%}"
    "{%- if role == 'user' -%}"
    "{%- if not loop.first -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>user\\n' ~ text ~ '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' ~ text }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _byte_symbols() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def _byte_level_bpe(family: str, extra_words: list[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    n_free = EXTRA_WORDS_END - EXTRA_WORDS_START
    if len(extra_words) > n_free:
        raise ValueError(f"extra_words: at most {n_free} words fit the tiny vocabulary, got {len(extra_words)}")
    vocab = {ch: b for b, ch in _byte_symbols().items()}  # id of a byte = its value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    chat = CHAT_TOKENS[family]

    def special(tokens):
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])

    def filler(lo, hi):
        return [f"|<EXTRA_TOKENS_{i}>|" for i in range(lo, hi)]

    # Added tokens take ids in insertion order: chat tokens, filler up to EXTRA_WORDS_START,
    # extra words, filler up to VOCAB_SIZE, Molmo2 tokens.
    special(chat + filler(256 + len(chat), EXTRA_WORDS_START))
    if extra_words:
        tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in extra_words])
    special(filler(EXTRA_WORDS_START + len(extra_words), VOCAB_SIZE) + MOLMO2_TOKENS)
    for t, i in TOKEN_IDS[family].items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return tok


def make_reference_processor_from_tokenizer(fast_tokenizer, **processor_kwargs):
    """A transformers `Molmo2Processor` around `fast_tokenizer` with the released Molmo2-4B/8B processor settings
    (`processor_kwargs` override them, e.g. `use_frame_special_tokens=True` as in Molmo2-8B-SFT)."""
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    settings = dict(image_use_col_tokens=True, use_single_crop_col_tokens=False, use_single_crop_start_token=True,
                    video_use_col_tokens=False, use_frame_special_tokens=False)
    return Molmo2Processor(
        image_processor=Molmo2ImageProcessor(max_crops=8),
        video_processor=Molmo2VideoProcessor(
            num_frames=384, max_fps=2, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True
        ),
        tokenizer=fast_tokenizer,
        chat_template=CHAT_TEMPLATE,
        **{**settings, **processor_kwargs},
    )


def make_tokenizer_dir(path, family: str = "qwen3", extra_words: list[str] | tuple[str, ...] = (),
                       **processor_kwargs) -> Path:
    """Write a tiny Molmo2 tokenizer + processor directory (released file names) and return its path;
    `processor_kwargs` override the released processor settings."""
    from transformers import PreTrainedTokenizerFast

    if family not in CHAT_TOKENS:
        raise ValueError(f"family must be one of {sorted(CHAT_TOKENS)}, got {family!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(family, list(extra_words))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **ROLE_TOKENS[family],
        image_token="<|image|>",
        video_token="<|video|>",
        model_max_length=1_010_000,
        clean_up_tokenization_spaces=False,
    )
    make_reference_processor_from_tokenizer(fast, **processor_kwargs).save_pretrained(str(path))
    # The released checkpoints also ship the sub-processor settings as separate files.
    common = {"do_convert_rgb": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "patch_size": 14,
              "resample": 2, "size": {"height": 378, "width": 378}, "processor_class": "Molmo2Processor"}
    released = {
        "preprocessor_config.json": {**common, "image_processor_type": "Molmo2ImageProcessor", "max_crops": 8,
                                     "overlap_margins": [4, 4], "pooling_size": [2, 2]},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Molmo2VideoProcessor",
                                           "frame_sample_mode": "uniform_last_frame", "num_frames": 384,
                                           "max_fps": 2.0, "sampling_fps": 2, "pooling_size": [3, 3],
                                           "do_sample_frames": True},
    }
    for name, content in released.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path


def make_reference_processor(path):
    """Load the transformers `Molmo2Processor` from a directory written by `make_tokenizer_dir`."""
    from transformers import Molmo2Processor

    return Molmo2Processor.from_pretrained(str(path))
