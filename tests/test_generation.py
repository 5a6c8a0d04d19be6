"""Jitted generation against the transformers reference `generate` (greedy, float32), stopping on EOS, sampling
options, shape buckets and bad input, on tiny random models of both families."""


import numpy as np
import pytest
import torch
from ref_model import collated, image_inputs, lively_reference, padded_batch, random_image, text_ids, video_inputs

import molmo2_jax
from molmo2_jax.api import InputError

NEW_TOKENS = 12
UNUSED_EOS = 299  # a base-vocabulary id the models are not seen to emit within NEW_TOKENS


@pytest.fixture(scope="module", params=["qwen3", "olmo3"])
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"gen_{request.param}")
    ref = lively_reference(path, request.param)
    return ref, molmo2_jax.load(path)


def reference_generate(ref, inputs, max_new_tokens=NEW_TOKENS, eos=UNUSED_EOS) -> list[np.ndarray]:
    """The reference's new tokens per row, cut before the first EOS."""
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        out = ref.generate(**tensors, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                           pad_token_id=0)
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].numpy():
        stop = np.flatnonzero(row == eos)
        rows.append(row[: stop[0]] if len(stop) else row)
    return rows


def assert_same_tokens(got, expected):
    assert len(got) == len(expected)
    for row, (g, e) in enumerate(zip(got, expected)):
        assert len(e) >= 10, f"row {row}: the reference stopped after {len(e)} tokens; the case is too weak"
        np.testing.assert_array_equal(g, e, err_msg=f"row {row}")


CASES = {
    "image": lambda: image_inputs([random_image(500, 400, 1)]),
    "two_images": lambda: image_inputs([random_image(378, 378, 2), random_image(90, 700, 3)], seed=1),
    "video": lambda: video_inputs(3),
    "video_im_start": lambda: video_inputs(3, frame_special_tokens=False),  # the released 4B/8B setting
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_reference_batch_1(models, case):
    ref, model = models
    inputs = CASES[case]()
    result = model.generate(inputs, max_new_tokens=NEW_TOKENS, eos_ids=[UNUSED_EOS])
    assert_same_tokens(result.token_ids, reference_generate(ref, inputs))


def image_batch():
    return [image_inputs([random_image(378, 378, 4)], seed=4),
            image_inputs([random_image(300, 500, 5), random_image(378, 378, 6)], seed=5),
            image_inputs([random_image(640, 200, 7)], seed=6)]


def video_batch():
    return [video_inputs(2, seed=7), video_inputs(4, seed=8, frame_special_tokens=False), video_inputs(3, seed=9)]


@pytest.mark.parametrize("make", [image_batch, video_batch], ids=["images", "videos"])
def test_greedy_matches_reference_batch_3_of_different_lengths(models, make):
    """Ours gets the batch right padded (as the processor pads by default), the reference left padded."""
    ref, model = models
    examples = make()
    assert len({ex["input_ids"].shape[1] for ex in examples}) == 3
    expected = reference_generate(ref, padded_batch(examples, "left"))
    result = model.generate(padded_batch(examples, "right"), max_new_tokens=NEW_TOKENS,
                            eos_ids=[UNUSED_EOS])
    assert result.prompt_tokens == [ex["input_ids"].shape[1] for ex in examples]
    assert_same_tokens(result.token_ids, expected)


def test_image_and_video_rows_in_one_batch(models):
    """An image row and a video row generated together give each row the reference's tokens for it alone."""
    ref, model = models
    examples = [image_inputs([random_image(300, 500, 10)], seed=10), video_inputs(3, 11, frame_special_tokens=False)]
    result = model.generate(collated(examples), max_new_tokens=NEW_TOKENS, eos_ids=[UNUSED_EOS])
    assert_same_tokens(result.token_ids, [reference_generate(ref, ex)[0] for ex in examples])


def test_stops_on_eos_per_row(models):
    """The token row 0 greedily emits at step 3 becomes an EOS id: each row stops where the reference does."""
    ref, model = models
    inputs = padded_batch(image_batch(), "left")
    free = model.generate(inputs, max_new_tokens=NEW_TOKENS, eos_ids=[UNUSED_EOS]).token_ids
    eos = int(free[0][3])
    expected = reference_generate(ref, inputs, eos=eos)
    got = model.generate(inputs, max_new_tokens=NEW_TOKENS, eos_ids=[UNUSED_EOS, eos]).token_ids
    assert len(got[0]) <= 3
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_sampling")
    lively_reference(path, "qwen3")
    return molmo2_jax.load(path)


def test_sampling_is_seeded_and_filtered(qwen3):
    inputs = image_inputs([random_image(378, 378, 1)])
    run = lambda **kw: [t.tolist() for t in qwen3.generate(inputs, max_new_tokens=NEW_TOKENS,
                                                           eos_ids=[UNUSED_EOS], **kw).token_ids]
    greedy = run()
    hot = dict(temperature=5.0)
    assert run(seed=1, **hot) == run(seed=1, **hot)
    assert run(seed=1, **hot) != run(seed=2, **hot)
    assert run(seed=3, top_k=1, **hot) == greedy
    assert run(seed=3, top_p=1e-6, **hot) == greedy

    # top-k: every sampled token is among the k most likely under teacher forcing
    sampled = np.asarray(run(seed=4, top_k=3, **hot)[0])
    ids = np.concatenate([inputs["input_ids"][0], sampled[:-1]])[None]
    extended = {**inputs, "input_ids": ids, "attention_mask": np.ones_like(ids),
                "mm_token_type_ids": np.pad(inputs["mm_token_type_ids"], ((0, 0), (0, len(sampled) - 1)))}
    logits = np.asarray(qwen3(extended))[0, inputs["input_ids"].shape[1] - 1:]
    ranks = (logits > logits[np.arange(len(sampled)), sampled][:, None]).sum(-1)
    assert ranks.max() < 3
    assert len(set(sampled.tolist())) > 1


def test_compiled_once_per_bucket(qwen3):
    rng = np.random.default_rng(0)
    short = {"input_ids": np.asarray([text_ids(rng, 9)])}
    longer = {"input_ids": np.asarray([text_ids(rng, 30)])}
    first = qwen3.generate(short, max_new_tokens=5)
    second = qwen3.generate(longer, max_new_tokens=20)
    assert first.compile_seconds > 0 and second.compile_seconds == 0
    assert len(second.token_ids[0]) == 20


@pytest.mark.parametrize("inputs, kwargs, message", [
    ({"input_ids": np.ones((1, 40000), np.int64)}, {}, "prompt of 40000 tokens exceeds the model's maximum length"),
    ({"input_ids": np.ones((1, 8), np.int64)}, {"max_new_tokens": 0}, "max_new_tokens must be a positive"),
    ({"input_ids": np.ones((1, 8), np.int64)}, {"top_p": 0.0}, "invalid sampling options"),
    ({"input_ids": np.ones((1, 8), np.int64), "position_ids": np.arange(8)[None]}, {}, "do not pass position_ids"),
    ({"input_ids": np.ones((1, 8), np.int64)}, {"max_length": 8}, "leaves no room for new tokens"),
])
def test_bad_input_is_one_clear_error(qwen3, inputs, kwargs, message):
    with pytest.raises(InputError, match=message):
        qwen3.generate(inputs, **{"max_new_tokens": 4, **kwargs})


def test_decode_steps_match_the_full_forward(qwen3):
    """Each decode step's logits, from a cache filled past one chunk of slots (its tail read in smaller chunks,
    the last one clamped to the buffer's end) with left-padded rows, equal the full forward pass over the row's
    prompt + tokens so far."""
    import jax
    import jax.numpy as jnp

    from molmo2_jax.model import kv_cache
    from molmo2_jax.model.molmo2 import decode_params, decode_step

    rng = np.random.default_rng(1)
    rows = [text_ids(rng, 300), text_ids(rng, 290)]
    slots = 304  # the 4 steps below fill it: their tail chunks reach past its end and are clamped
    assert kv_cache.CHUNK < 300 and kv_cache.CHUNK + kv_cache.TAIL_CHUNK > slots
    ids = np.zeros((2, 300), np.int32)
    mask = np.zeros((2, 300), np.int32)
    for r, row in enumerate(rows):
        ids[r, 300 - len(row):], mask[r, 300 - len(row):] = row, 1
    _, (k, v) = qwen3.apply(jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_kv=True)
    cache = kv_cache.from_prompt(k, v, jnp.asarray(mask), jnp.asarray(mask.sum(1)), slots)
    step = jax.jit(lambda p, t, c: decode_step(qwen3.config, p, t, c))
    params = decode_params(qwen3.params)
    token = jnp.asarray([7, 11], jnp.int32)
    for _ in range(4):
        rows = [row + [int(t)] for row, t in zip(rows, token)]
        logits, cache = step(params, token, cache)
        for r, row in enumerate(rows):
            expected = np.asarray(qwen3({"input_ids": np.asarray([row])}))[0, -1]
            np.testing.assert_allclose(np.asarray(logits[r]), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        token = jnp.argmax(logits, -1).astype(jnp.int32)


def test_cache_slots(qwen3):
    """A larger cache than needed gives the same tokens; a bad value is one clear error."""
    inputs = image_inputs([random_image(378, 378, 1)])
    run = lambda **kw: [t.tolist() for t in qwen3.generate(inputs, max_new_tokens=NEW_TOKENS,
                                                           eos_ids=[UNUSED_EOS], **kw).token_ids]
    assert run(cache_slots=2048) == run()
    with pytest.raises(InputError, match="cache_slots must be a non-negative integer"):
        run(cache_slots=-5)
