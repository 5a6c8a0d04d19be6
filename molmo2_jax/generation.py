"""Text generation under jit: one compiled prefill (the prompt with its bidirectional image block, attending
the prompt only; its keys/values start the KV cache) and one compiled decode loop (`lax.while_loop`) whose
steps write the cache in place and attend its filled slots (`model/kv_cache.py`). The decode loop runs the
layers unrolled on per-layer params, derived once per model from the stacked (training) layout.

Prompts are left padded (positions follow `cumsum(attention_mask) - 1`, as in the reference) and padded to
shape buckets: the prompt length to a multiple of `PROMPT_BUCKET`, the cache to a multiple of `CACHE_BUCKET`,
each row's crops / frames to the next 2^k or 3 * 2^k (at most a third of the ViT work is padding) and its
pooled-token rows to a multiple of `POOL_BUCKET`. A program is compiled once per bucket and reused for every prompt and
`max_new_tokens` that fits it. Sampling options (temperature, top-k, top-p, seed) are runtime values; only
greedy vs sampling changes the program.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from molmo2_jax.batch import INPUT_KEYS, InputError, fill_value, to_rows
from molmo2_jax.model import kv_cache
from molmo2_jax.model.molmo2 import decode_params, decode_step, lm_logits

if TYPE_CHECKING:  # api imports this module when a model generates
    from molmo2_jax.api import Molmo2Model

PROMPT_BUCKET = 64
CACHE_BUCKET = 128
POOL_BUCKET = 64
VISUAL_KEYS = ("pixel_values", "image_token_pooling", "pixel_values_videos", "video_token_pooling")


@dataclass
class GenerationResult:
    """New tokens per prompt (without padding and EOS), their text when a tokenizer was given, and timings.

    `compile_seconds` is 0 when the bucket's programs were already compiled; `prefill_seconds` and
    `decode_seconds` exclude compilation.
    """

    token_ids: list[np.ndarray]
    texts: list[str] | None
    prompt_tokens: list[int]
    compile_seconds: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over the batch (new tokens after the first, which prefill produces)."""
        decoded = max(self.num_new_tokens - len(self.token_ids), 0)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _crop_bucket(n: int) -> int:
    """The smallest 2^k or 3 * 2^k that is >= n."""
    power = 1
    while power < n:
        if power * 3 // 2 >= n:
            return power * 3 // 2
        power *= 2
    return power


def _pad_rows(array: np.ndarray, rows: int, fill) -> np.ndarray:
    pad = [(0, 0), (0, rows - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=fill)


def left_pad(inputs: Mapping[str, Any], multimodal_ids: Sequence[int], max_positions: int):
    """Token arrays moved to the right end of a bucketed width, per-row visual arrays (`batch.to_rows`) padded to
    bucket sizes.

    Returns (padded copy of `inputs`, real prompt lengths). `mm_token_type_ids` is derived from the token ids
    when absent. Keys other than the model inputs pass through unchanged (the model's `prepare` checks them).
    """
    if inputs.get("position_ids") is not None or inputs.get("segment_ids") is not None:
        raise InputError("generation computes positions itself; do not pass position_ids / segment_ids "
                         "(packed sequences cannot be generated from)")
    if inputs.get("input_ids") is None:
        raise InputError("model inputs need 'input_ids'")
    ids = np.asarray(inputs["input_ids"])
    ids = ids[None] if ids.ndim == 1 else ids
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids))).reshape(ids.shape).astype(bool)
    types = inputs.get("mm_token_type_ids")
    types = np.isin(ids, multimodal_ids) if types is None else np.asarray(types).reshape(ids.shape)
    lengths = mask.sum(axis=1)
    if lengths.min() == 0:
        raise InputError(f"prompt {int(np.argmin(lengths))} of the batch is empty (attention_mask all 0)")
    longest = int(lengths.max())
    if longest > max_positions:
        raise InputError(f"prompt of {longest} tokens exceeds the model's maximum length {max_positions}")
    width = min(_round_up(longest, PROMPT_BUCKET), max_positions)
    out = dict(inputs)
    tokens = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    if inputs.get("video_patch_mask") is not None:
        tokens["video_patch_mask"] = np.asarray(inputs["video_patch_mask"]).reshape(ids.shape)
    for key, values in tokens.items():
        out[key] = np.zeros((ids.shape[0], width), np.int32)
        for row, n in enumerate(lengths):
            out[key][row, width - n:] = values[row][mask[row]]
    for key in VISUAL_KEYS:
        if inputs.get(key) is not None and np.shape(inputs[key])[1]:
            array = np.asarray(inputs[key])
            rows = array.shape[1]
            rows = _round_up(rows, POOL_BUCKET) if key.endswith("pooling") else _crop_bucket(rows)
            out[key] = _pad_rows(array, rows, fill_value(key))
    return out, lengths.tolist()


def _select(logits: jax.Array, key: jax.Array, sample: bool, temperature, top_k, top_p) -> jax.Array:
    """Next token `[B]` from last-position logits `[B, V]`: argmax, or a draw after temperature, top-k and
    top-p filtering (in that order, as the reference's logits processors)."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])
    keep = (top_k <= 0) | (rank < top_k)
    ranked = jnp.where(keep, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & ((mass_before < top_p) | (rank == 0))  # the most likely token always stays
    choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class _Programs:
    """The prefill and decode functions of one model and their executables, compiled once per bucket."""

    def __init__(self, model: Molmo2Model):
        self.model = weakref.proxy(model)
        self.compiled: dict[tuple, Any] = {}
        self._decode_params: tuple[Any, dict[str, Any]] | None = None  # (the model params they come from, them)

    def decode_params(self) -> dict[str, Any]:
        """The model's params as a decode step reads them (per-layer decoder weights), derived once per model
        (again only if its params are replaced). They are a second copy of the decoder layers, held as long
        as the model: the price of not slicing every layer's weights out of the stack on every step."""
        params = self.model.params
        if self._decode_params is None or self._decode_params[0] is not params:
            self._decode_params = (params, decode_params(params))
        return self._decode_params[1]

    def prefill(self, params, inputs, options, *, cache_len: int, sample: bool):
        """Run the prompt through the model; the first new token `[B]` and a cache of `cache_len` slots holding
        the prompt's keys/values."""
        config, mesh = self.model.config, self.model.mesh
        hidden, (k, v) = self.model.module.apply({"params": params}, **inputs, return_hidden=True, return_kv=True)
        seg = inputs["attention_mask"]
        cache = kv_cache.from_prompt(k, v, seg, seg.sum(axis=1), cache_len)
        if mesh is not None:  # sharded over the batch / kv heads, as the decode loop keeps it
            cache = jax.lax.with_sharding_constraint(cache, kv_cache.shardings(config, mesh, seg.shape[0], cache_len))
        # logits of the last position only: the full [B, T, vocab] projection would be most of a short prefill
        logits = lm_logits(hidden[:, -1], params["lm_head"])
        key = jax.random.fold_in(options["key"], 0)
        first = _select(logits, key, sample, options["temperature"], options["top_k"], options["top_p"])
        return first, cache

    def decode(self, params, cache, first, options, *, width: int, sample: bool):
        """Feed each new token back until every row emitted EOS or the budget is spent; tokens `[B, width]`
        (pad after a row's EOS), the number of steps taken and the final cache (returned so that the donated
        input cache is the loop's buffer, not copied). `params` from `decode_params`."""
        batch = first.shape[0]
        out = jnp.full((batch, width), options["pad"], jnp.int32).at[:, 0].set(first)

        def cond(state):
            _, _, step, done, _ = state
            return (step < options["budget"]) & ~jnp.all(done)

        def body(state):
            cache, out, step, done, token = state
            logits, cache = decode_step(self.model.config, params, token, cache)
            key = jax.random.fold_in(options["key"], step)
            token = _select(logits, key, sample, options["temperature"], options["top_k"], options["top_p"])
            token = jnp.where(done, options["pad"], token)
            out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
            return cache, out, step + 1, done | jnp.isin(token, options["eos"]), token

        state = (cache, out, jnp.int32(1), jnp.isin(first, options["eos"]), first)
        cache, out, steps, _, _ = jax.lax.while_loop(cond, body, state)
        return out, steps, cache

    def get(self, name: str, *args, donate: tuple[int, ...] = (), **static) -> tuple[Any, float]:
        """The executable of `name` for these argument shapes and static values (the `donate` arguments'
        buffers are reused for its outputs), and the seconds spent compiling it (0 when it was compiled
        before)."""
        avals = jax.tree.map(lambda x: (np.shape(x), str(x.dtype)), args)
        key = (name, tuple(sorted(static.items())), str(jax.tree.structure(args)), str(jax.tree.leaves(avals)))
        if key in self.compiled:
            return self.compiled[key], 0.0
        start = time.perf_counter()
        fn = jax.jit(functools.partial(getattr(self, name), **static), donate_argnums=donate)
        self.compiled[key] = fn.lower(*args).compile()
        return self.compiled[key], time.perf_counter() - start


_PROGRAMS: weakref.WeakKeyDictionary[Molmo2Model, _Programs] = weakref.WeakKeyDictionary()


def _programs(model: Molmo2Model) -> _Programs:
    if model not in _PROGRAMS:
        _PROGRAMS[model] = _Programs(model)
    return _PROGRAMS[model]


def generate(model: Molmo2Model, inputs: Mapping[str, Any], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] | None = None,
             tokenizer=None, max_length: int | None = None, cache_slots: int = 0) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens for each prompt of a processor output dict (one or several).

    Greedy when `temperature` is 0, else sampling with `temperature`, `top_k` (0: off) and `top_p` (1: off)
    from `seed`. A row stops at any of `eos_ids` (default: the checkpoint's EOS ids); the loop ends when every
    row has stopped or the budget is spent. `max_length` caps prompt + new tokens (default: the model's
    maximum length). With a `tokenizer` (anything with `decode(ids, skip_special_tokens=...)`) the texts are
    decoded too. The KV cache has room for prompt + budget, rounded up to `CACHE_BUCKET` slots, or at least
    `cache_slots` (one compiled decode for every prompt and budget that fit it; a step's cost does not grow
    with empty slots).
    """
    config = model.config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(cache_slots, int) or cache_slots < 0:
        raise InputError(f"cache_slots must be a non-negative integer, got {cache_slots!r}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise InputError(f"invalid sampling options temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    max_positions = config.text.max_position_embeddings
    max_length = max_positions if max_length is None else min(max_length, max_positions)
    rows = to_rows({k: v for k, v in inputs.items() if v is not None}, config.tokens.image_patch,
                   config.vision.num_patches)
    padded, lengths = left_pad(rows, config.tokens.multimodal, max_positions)
    budget = min(max_new_tokens, max_length - max(lengths))
    if budget < 1:
        raise InputError(f"prompt of {max(lengths)} tokens leaves no room for new tokens within max_length "
                         f"{max_length}")
    prepared = {k: v for k, v in model.prepare(padded).items() if k in INPUT_KEYS}
    prompt_width = prepared["input_ids"].shape[1]
    cache_len = _round_up(max(prompt_width + budget, cache_slots), CACHE_BUCKET)
    eos = np.asarray(config.tokens.eos if eos_ids is None else list(eos_ids), np.int32).reshape(-1)
    sample = temperature > 0
    options = {"key": jax.random.key(seed), "temperature": jnp.float32(max(temperature, 1e-6)),
               "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p), "eos": jnp.asarray(eos),
               "pad": jnp.int32(config.tokens.pad), "budget": jnp.int32(budget)}
    programs = _programs(model)
    with model.context():
        prefill, compile_prefill = programs.get("prefill", model.params, prepared, options, cache_len=cache_len,
                                                sample=sample)
        start = time.perf_counter()
        first, cache = prefill(model.params, prepared, options)
        first.block_until_ready()
        prefill_seconds = time.perf_counter() - start
        params = programs.decode_params()
        decode, compile_decode = programs.get("decode", params, cache, first, options, donate=(1,),
                                              width=cache_len - prompt_width + 1, sample=sample)
        start = time.perf_counter()
        out, steps, _ = decode(params, cache, first, options)
        out = np.asarray(out)
        decode_seconds = time.perf_counter() - start
    token_ids = []
    for row in out[:, :int(steps)]:
        stops = np.flatnonzero(np.isin(row, eos))
        token_ids.append(row[: stops[0]] if len(stops) else row)
    texts = None if tokenizer is None else [tokenizer.decode(t.tolist(), skip_special_tokens=True)
                                            for t in token_ids]
    return GenerationResult(token_ids, texts, lengths, compile_prefill + compile_decode, prefill_seconds,
                            decode_seconds)
