"""The `molmo2-jax generate` command on a tiny checkpoint with its tokenizer and processor files: the answer
matches the reference processor + reference `generate`, JSON and drawings are written, bad requests give one
line."""

import json
import re

import av
import numpy as np
import pytest
import torch
from PIL import Image
from ref_model import random_image, tokenizer_checkpoint
from ref_tokenizer import make_reference_processor

from molmo2_jax.cli import main
from molmo2_jax.commands.generate import report

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Qwen3-style checkpoint whose token ids match the test tokenizer, with its processor files."""
    path = tmp_path_factory.mktemp("cli_ckpt")
    return path, tokenizer_checkpoint(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    random_image(300, 200, 1).save(d / "a.png")
    random_image(120, 260, 2).save(d / "b.png")
    rng = np.random.default_rng(0)
    with av.open(str(d / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return d


def run_cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def reference_answer(path, model, prompt, images):
    processor = make_reference_processor(path)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=text, images=images, return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_image_answer_matches_reference_and_is_drawn(checkpoint, media, capsys, tmp_path):
    path, ref = checkpoint
    images = [Image.open(media / "a.png").convert("RGB"), Image.open(media / "b.png").convert("RGB")]
    expected = reference_answer(path, ref, "Point to the dogs.", images)
    code, out, err = run_cli(capsys, "--checkpoint", path, "--image", media / "a.png", "--image", media / "b.png",
                             "--prompt", "Point to the dogs.", "--max-new-tokens", NEW_TOKENS,
                             "--draw", tmp_path / "drawn.png")
    assert code == 0, err
    assert out[:-1] == expected and expected
    assert "prefill" in err and "tokens/s" in err
    assert Image.open(tmp_path / "drawn.png").size == (300, 200)
    assert Image.open(tmp_path / "drawn-2.png").size == (120, 260)


def test_video_json_and_track_drawing(checkpoint, media, capsys, tmp_path):
    path, _ = checkpoint
    args = ["--checkpoint", path, "--video", media / "clip.mp4", "--prompt", "Track the cat.",
            "--max-new-tokens", NEW_TOKENS]
    code, plain, err = run_cli(capsys, *args)
    assert code == 0, err
    code, out, err = run_cli(capsys, *args, "--json", "--draw", tmp_path / "tracks.gif")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"answer", "groundings", "count"}
    assert result["answer"] == plain[:-1]
    assert Image.open(tmp_path / "tracks.gif").n_frames == 4


def test_report_parses_groundings_in_pixels():
    answer = 'Counting the <points coords="1 1 500 500 2 250 750">dog</points> shows a total of 2.'
    result = report(answer, image_sizes=[(300, 200)])
    assert result["count"] == 2
    [grounding] = result["groundings"]
    assert grounding["label"] == "dog"
    assert [(p["x"], p["y"]) for p in grounding["points"]] == [(150.0, 100.0), (75.0, 150.0)]
    json.dumps(result)


@pytest.mark.parametrize("extra, message", [
    (["--image", "missing.png"], "error: --image missing.png: file not found"),
    (["--image", "{media}/a.png", "--video", "{media}/clip.mp4"], "error: give --image or --video, not both"),
    (["--image", "{media}/a.png", "--prompt", "x" * 40000],
     "error: prompt of \\d+ tokens exceeds the model's maximum length 36864"),
    (["--video", "{media}/clip.mp4", "--draw", "out.png"], "error: --draw out.png: use a .gif or .mp4 file"),
])
def test_bad_requests_fail_with_one_line(checkpoint, media, capsys, extra, message):
    path, _ = checkpoint
    extra = [e.format(media=media) for e in extra]
    code, out, err = run_cli(capsys, "--checkpoint", path, "--prompt", "Hi", *extra)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("molmo2-jax generate: ")
    assert re.search(message, err), err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "nope", "--prompt", "Hi")
    assert code == 1
    assert err.strip() == f"molmo2-jax generate: error: --checkpoint {tmp_path / 'nope'}: directory not found"
