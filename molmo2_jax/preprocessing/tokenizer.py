"""Tokenizer loading: a `tokenizers` `tokenizer.json` (released Qwen3 / Olmo3 files) or a sentencepiece `.model`.

Special-token strings (bos / eos / pad) come from the checkpoint's `tokenizer_config.json` or
`special_tokens_map.json`; their ids from the vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from molmo2_jax.preprocessing.errors import TokenizerLoadError

MOLMO2_SPECIAL_TOKENS = (
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>",
    "<|image|>", "<im_low>", "<frame_start>", "<frame_end>", "<|video|>",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"cannot read {path}: {e}") from None


def _token_str(value: Any) -> str | None:
    """A special token entry is either a string or an AddedToken-style dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class _SentencePieceBackend:
    """sentencepiece model plus added tokens matched verbatim before the model sees the text."""

    def __init__(self, model_path: Path, added: dict[str, int], specials: Sequence[str] = ()):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.added = dict(added)
        # Special tokens that are pieces of the model (bos / eos / pad) are also matched verbatim,
        # so no word-boundary marker is inserted before them.
        for token in specials:
            if token and token not in self.added and self.sp.id_to_piece(self.sp.piece_to_id(token)) == token:
                self.added[token] = self.sp.piece_to_id(token)
        self.id_to_added = {i: t for t, i in self.added.items()}
        ordered = sorted(self.added, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def encode(self, text: str) -> list[int]:
        if self.pattern is None:
            return list(self.sp.encode(text))
        ids: list[int] = []
        pos = 0
        for m in self.pattern.finditer(text):
            if m.start() > pos:
                ids.extend(self.sp.encode(text[pos : m.start()]))
            ids.append(self.added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self.sp.encode(text[pos:]))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for i in ids:
            if i in self.id_to_added:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.id_to_added[i])
            else:
                run.append(int(i))
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


class _TokenizersBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise TokenizerLoadError(f"cannot load {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class Molmo2Tokenizer:
    """Text <-> ids with the checkpoint's special tokens; no torch, no transformers."""

    def __init__(self, backend: Any, *, bos_token: str | None, eos_token: str, pad_token: str | None,
                 padding_side: str = "right", source: str = "tokenizer"):
        self._backend = backend
        self.source = source
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token or eos_token
        self.padding_side = padding_side
        self.eos_token_id = self.token_to_id(eos_token)
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.pad_token_id = self.token_to_id(self.pad_token)
        missing = [t for t in MOLMO2_SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise TokenizerLoadError(f"{source} lacks the Molmo2 special tokens {missing}")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Molmo2Tokenizer:
        """Load from a checkpoint directory (or a `tokenizer.json` / `.model` file inside one)."""
        path = Path(path)
        if path.is_file():
            directory, model_file = path.parent, path
        elif path.is_dir():
            directory = path
            candidates = [path / "tokenizer.json", *sorted(path.glob("*.model"))]
            model_file = next((p for p in candidates if p.is_file()), None)
            if model_file is None:
                raise TokenizerLoadError(f"no tokenizer.json or sentencepiece .model file in {path}")
        else:
            raise TokenizerLoadError(f"tokenizer path not found: {path}")

        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                config.update({k: v for k, v in _read_json(directory / name).items() if v is not None})
        if model_file.suffix == ".json":
            backend: Any = _TokenizersBackend(model_file)
        else:
            added = {_token_str(v): int(k) for k, v in config.get("added_tokens_decoder", {}).items()}
            if (directory / "added_tokens.json").is_file():
                added.update(_read_json(directory / "added_tokens.json"))
            specials = [_token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
            backend = _SentencePieceBackend(model_file, added, specials)
        eos = _token_str(config.get("eos_token"))
        if eos is None:
            raise TokenizerLoadError(f"no eos_token in {directory}/tokenizer_config.json or special_tokens_map.json")
        return cls(backend, bos_token=_token_str(config.get("bos_token")), eos_token=eos,
                   pad_token=_token_str(config.get("pad_token")), padding_side=config.get("padding_side", "right"),
                   source=str(model_file))

    def token_to_id(self, token: str) -> int:
        """Id of a single token; raises `TokenizerLoadError` when it is not in the vocabulary."""
        i = self._backend.token_to_id(token)
        if i is None:
            raise TokenizerLoadError(f"token {token!r} is not in the vocabulary of {self.source}")
        return i

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text map to their ids."""
        return self._backend.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self._backend, "encode_batch"):
            return self._backend.encode_batch(texts)
        return [self._backend.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(ids, skip_special_tokens)
