"""A video's subtitles written as Ai2's preprocessing writes them (olmo/preprocessing/video_preprocessor.py,
subtitle_mode "frame_1") where the released chat template puts them, and clips: only a clip's frames
decoded, its times counted from the clip's start (olmo/data/video_loader.py)."""

import json

import numpy as np
import pytest
from ref_tokenizer import make_reference_processor, make_tokenizer_dir
from test_preprocessing_video import frame_value, write_mp4

from molmo2_jax.data.conversation import subtitle_text, tokenize_conversation
from molmo2_jax.data.errors import BadExampleError
from molmo2_jax.data.manifest import ManifestSource, parse_line
from molmo2_jax.preprocessing import Molmo2Processor, VideoDecodeError, decode_video

SUBTITLES = [{"start": 0.2, "end": 1.4, "text": "hello there"}, {"start": 3.0, "end": 3.5, "text": "bye"},
             {"start": 9.0, "end": 10.0, "text": "far away"}]


def test_subtitles_within_a_second_of_a_frame_are_kept():
    # frames at 0, 10, 20 s; a subtitle is kept when it overlaps [t - 1, t + 1] of some frame t
    subtitles = [{"start": 4.0, "end": 5.5, "text": "gap"}, {"start": 8.5, "end": 9.0, "text": "edge"},
                 {"start": 20.9, "end": 22.0, "text": "late"}, {"start": 21.1, "end": 22.0, "text": "too late"},
                 {"start": 0.04, "end": 1.25, "text": "first"}]
    assert subtitle_text(subtitles, [0.0, 10.0, 20.0]) == (
        "subtitle\n8.5 - 9.0 edge\n20.9 - 22.0 late\n0.0 - 1.2 first\n")
    assert subtitle_text(subtitles[:1], [0.0]) == "subtitle\n"  # none kept: the header alone, as Ai2's


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    d = make_tokenizer_dir(tmp_path_factory.mktemp("tok"), "qwen3", extra_words=["hello", "there", "bye"])
    return make_reference_processor(d), Molmo2Processor.from_pretrained(d)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("vid") / "talk.mp4", 4, 6)


def test_subtitles_follow_the_frames_where_the_released_template_puts_them(procs, video):
    ref, ours = procs
    messages = [{"role": "subtitle", "subtitles": SUBTITLES}, {"role": "user", "content": "What is said?"},
                {"role": "assistant", "content": "A greeting."}]
    ex = tokenize_conversation(ours, messages, video=video, name="talk")
    # the reference: transformers' processor on the template with a leading subtitle message whose text is
    # Ai2's block for frames 0, 0.5, ..., 4 s (the 9-10 s subtitle is more than 1 s from every frame)
    block = "subtitle\n0.2 - 1.4 hello there\n3.0 - 3.5 bye\n"
    chat = [{"role": "subtitle", "content": block},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is said?"}]}]
    text = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    v = decode_video(video)
    meta = {"total_num_frames": len(v.frames), "fps": v.fps, "frames_indices": list(v.timestamps * v.fps)}
    want = ref(text=text, videos=[v.frames], do_sample_frames=False, video_metadata=[meta],
               return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(ex["input_ids"][:len(want)], want)
    assert not ex["token_weights"][:len(want)].any()  # no loss on subtitles
    tail = ours.tokenizer.decode(ex["input_ids"][len(want):])
    assert tail == "A greeting.<|im_end|>"


def test_manifest_subtitles_and_bad_ones(tmp_path, procs, video):
    _, ours = procs
    good = {"id": "s1", "video": video, "subtitles": SUBTITLES[:2],
            "messages": [{"role": "user", "content": "What is said?"}, {"role": "assistant", "content": "Hi."}]}
    bad = [dict(good, id="s2", subtitles=[{"start": "0:01", "end": 2.0, "text": "x"}]),
           dict(good, id="s3", subtitles=[{"start": 3.0, "end": 2.0, "text": "x"}]),
           dict(good, id="s4", subtitles="0.0 --> 1.0 hi"),
           {k: v for k, v in dict(good, id="s5").items() if k != "video"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
    source = ManifestSource(path)
    raw = parse_line(source[0])
    assert raw["messages"][0] == {"role": "subtitle", "subtitles": SUBTITLES[:2]}
    ex = tokenize_conversation(ours, raw["messages"], raw["images"], raw["video"], name=raw["id"])
    assert "subtitle\n0.2 - 1.4 hello there\n3.0 - 3.5 bye\n<|im_start|>user" in ours.tokenizer.decode(ex["input_ids"])
    messages = []
    for n in range(1, 5):
        with pytest.raises(BadExampleError) as e:
            parse_line(source[n])
        messages.append(str(e.value))
    assert all(f"m.jsonl:{n + 1} (s{n + 1})" in m and "\n" not in m for n, m in enumerate(messages, 1))
    assert "subtitle 0 is not {start, end (seconds), text}" in messages[0]
    assert "subtitle 0 ends (2.0) before it starts (3.0)" in messages[1]
    assert "subtitles must be a list" in messages[2] and "'subtitles' need a 'video'" in messages[3]


def test_a_clip_decodes_only_its_frames_with_times_from_its_start(tmp_path):
    path = write_mp4(tmp_path / "ten.mp4", 10, 8)
    v = decode_video(path, clip=(6.0, 8.5))
    np.testing.assert_allclose(v.timestamps, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    # the frames on screen at 6.0, 6.5, ... 8.5 s of the video
    want = [frame_value(int(t * 8)) for t in np.arange(6.0, 8.6, 0.5)]
    assert np.abs(v.frames[:, 16, 16].astype(int).mean(-1) - want).max() <= 3  # lossy coding
    # an end past the video is cut to it, as Ai2's loaders do: 8..10 s
    np.testing.assert_allclose(decode_video(path, clip=(8.0, 30.0)).timestamps, [0.0, 0.5, 1.0, 1.5, 2.0])
    for clip in [(10.0, 12.0), (5.0, 5.0), (-1.0, 2.0)]:
        with pytest.raises(VideoDecodeError, match=f"clip {clip[0]}-{clip[1]} s is not inside the 10.00 s video"):
            decode_video(path, clip=clip)
