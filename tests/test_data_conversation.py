"""Conversations -> tokens: loss only on answers (+ EOS) with Molmo2's weights, the prompt equal to the chat
template, structured manifest targets formatted on the 0..1000 scale, and bad examples named."""

import math

import numpy as np
import pytest
from test_data_common import qa, synthetic_root, write_manifest, write_media  # noqa: F401  (fixture)

from molmo2_jax.data.conversation import tokenize_conversation
from molmo2_jax.data.errors import BadExampleError
from molmo2_jax.data.manifest import ManifestSource, parse_line
from molmo2_jax.grounding import parse
from molmo2_jax.preprocessing import Molmo2Processor
from molmo2_jax.preprocessing.chat_template import apply_chat_template


@pytest.fixture(scope="module")
def processor(synthetic_root):
    return Molmo2Processor.from_pretrained(synthetic_root / "tokenizer")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_media(tmp_path_factory.mktemp("media"))


def _runs(weights):
    """(start, end) of the runs of non-zero weights."""
    nz = np.flatnonzero(weights)
    breaks = np.flatnonzero(np.diff(nz) > 1)
    starts = np.concatenate([[nz[0]], nz[breaks + 1]])
    ends = np.concatenate([nz[breaks], [nz[-1]]]) + 1
    return list(zip(starts.tolist(), ends.tolist()))


def test_loss_on_answers_only_with_molmo2_weights(processor, media):
    tok = processor.tokenizer
    messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "There are none."},
                {"role": "user", "content": "Describe it."}, {"role": "assistant", "content": "A noisy image."}]
    ex = tokenize_conversation(processor, messages, [media["image"]], name="ex")
    ids, w = ex["input_ids"], ex["token_weights"]
    runs = _runs(w)
    assert [tok.decode(ids[a:b]) for a, b in runs] == ["There are none.<|im_end|>", "A noisy image.<|im_end|>"]
    for a, b in runs:  # 2/sqrt(n) per answer, 1/sqrt(2) for two annotations of one image
        np.testing.assert_allclose(w[a:b], 2 / math.sqrt(b - a) / math.sqrt(2), rtol=1e-6)
    # the whole sequence is the training layout (the released template without the space it writes before
    # assistant turns taken from messages; Molmo2's training formatter has none) with BOS and the image expanded
    whole = processor(apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}, *messages[1:]],
        add_generation_prompt=False) + "<|im_end|>", images=[str(media["image"])])
    np.testing.assert_array_equal(ids, whole["input_ids"][0])
    np.testing.assert_array_equal(ex["mm_token_type_ids"], whole["mm_token_type_ids"][0])
    np.testing.assert_array_equal(ex["image_token_pooling"], whole["image_token_pooling"])


def test_loss_multiplier_scales_a_single_answer(processor):
    ex = tokenize_conversation(processor, qa(1)["messages"], loss_multiplier=0.2)
    (a, b), = _runs(ex["token_weights"])
    np.testing.assert_allclose(ex["token_weights"][a:b], 0.2 * 2 / math.sqrt(b - a), rtol=1e-6)


def test_manifest_points_and_tracks_are_formatted(tmp_path, processor, media):
    path = write_manifest(tmp_path / "m.jsonl", [
        {"id": "pts", "image": str(media["image"]), "messages": [
            {"role": "user", "content": "Count the dots."},
            {"role": "assistant", "label": "dots", "format": "count",
             "points": [{"x": 16, "y": 60}, {"x": 80, "y": 12}]}]},
        {"id": "trk", "video": str(media["video"]), "messages": [
            {"role": "user", "content": "Track it."},
            {"role": "assistant", "label": "thing", "tracks": [
                {"id": 7, "points": [{"t": 0.0, "x": 48, "y": 32}, {"t": 0.5, "x": 24, "y": 16}]}]}]},
    ])
    source = ManifestSource(path)
    for i, expected in ((0, [(16, 60), (80, 12)]), (1, [(48, 32), (24, 16)])):
        raw = parse_line(source[i])
        ex = tokenize_conversation(processor, raw["messages"], raw["images"], raw["video"], name=raw["id"])
        (a, b), = _runs(ex["token_weights"])
        answer = processor.tokenizer.decode(ex["input_ids"][a : b - 1])
        size = (160, 120) if i == 0 else (96, 64)
        (g,) = parse(answer, image_sizes=[size]) if i == 0 else parse(answer, video_size=size)
        got = [(p.x, p.y) for p in g.points] or [(x, y) for _, x, y in g.tracks[0].points]
        np.testing.assert_allclose(sorted(got), sorted(expected), atol=0.2)
        if i == 0:
            assert answer.startswith("Counting the <points coords=\"1 1 100 500 2 500 100\">dots</points>")
        else:
            assert "pixel_values_videos" in ex and ex["video_token_pooling"].shape[1] == 9


@pytest.mark.parametrize("case, message", [
    ("missing", "image file not found: {dir}/nope.png"),
    ("corrupt", "cannot decode video {dir}/corrupt.mp4"),
    ("bad_point", "messages[1].points[0].x must be a finite number, got 'left'"),
    ("outside", "is outside [0, 160] x [0, 120]"),
    ("bad_json", "m.jsonl:1: not valid JSON"),
])
def test_bad_examples_name_the_line_and_the_problem(tmp_path, processor, media, case, message):
    lines = {
        "missing": {"id": "x", "image": "nope.png", **{k: v for k, v in qa(0).items() if k != "id"}},
        "corrupt": {"id": "x", "video": "corrupt.mp4", **{k: v for k, v in qa(0).items() if k != "id"}},
        "bad_point": {"id": "x", "image": "image.png", "messages": [
            {"role": "user", "content": "Point."}, {"role": "assistant", "points": [{"x": "left", "y": 3}]}]},
        "outside": {"id": "x", "image": "image.png", "messages": [
            {"role": "user", "content": "Point."}, {"role": "assistant", "points": [{"x": 500, "y": 3}]}]},
        "bad_json": '{"id": "x", "messages": [',
    }
    (tmp_path / "image.png").write_bytes(media["image"].read_bytes())
    (tmp_path / "corrupt.mp4").write_bytes(media["corrupt"].read_bytes())
    source = ManifestSource(write_manifest(tmp_path / "m.jsonl", [lines[case]]))
    with pytest.raises(BadExampleError) as info:
        raw = parse_line(source[0])
        tokenize_conversation(processor, raw["messages"], raw["images"], raw["video"], name=raw["id"])
    text = str(info.value)
    assert message.format(dir=tmp_path) in text
    assert "\n" not in text
    if case != "bad_json":
        assert text.startswith(f"{tmp_path}/m.jsonl:1 (x)")
