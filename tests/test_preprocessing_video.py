"""Video: the released time-based sampling, decoding only sampled frames, per-frame parity, bad files."""

import av
import numpy as np
import pytest

from molmo2_jax.preprocessing import VideoDecodeError, decode_video, sample_indices, sample_times
from molmo2_jax.preprocessing.video import VideoConfig, preprocess_frames

ONE_STEP = 2 / 255 + 1e-6


def frame_value(i: int) -> int:
    """Grey level of frame i in the test videos (identifies the frame after lossy coding)."""
    return (i * 7) % 256


def write_mp4(path, seconds: float, fps: int, size: int = 32, keyframe_every: int | None = None) -> str:
    """A tiny H.264 MP4 (with B-frames) whose frame i is a flat image of grey `frame_value(i)`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if keyframe_every:
            stream.gop_size = keyframe_every
        for i in range(int(round(seconds * fps))):
            arr = np.full((size, size, 3), frame_value(i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def expected_frames(times, seconds, fps):
    """Index of the frame on screen at each time (frame i covers [i/fps, (i+1)/fps))."""
    n = int(round(seconds * fps))
    ends = np.append(np.arange(1, n) / fps, seconds)
    return np.minimum(np.searchsorted(ends, times, side="right"), n - 1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"short": write_mp4(d / "short.mp4", 10, 8),
            "long": write_mp4(d / "long.mp4", 250, 4, keyframe_every=20)}  # keyframes let the decoder seek


def _check_decoded(video, seconds, fps, times):
    np.testing.assert_allclose(video.timestamps, times, atol=1e-9)
    want = np.array([frame_value(i) for i in expected_frames(times, seconds, fps)])
    got = video.frames[:, 16, 16].astype(int).mean(-1)
    assert np.abs(got - want).max() <= 3  # lossy coding, but neighbours differ by 7 grey levels


def test_short_video_uses_half_second_grid_and_last_frame(videos):
    v = decode_video(videos["short"])
    times = np.append(np.arange(0, 10, 0.5), 10.0)  # <= 2 fps, last frame appended
    assert v.duration == pytest.approx(10.0)
    _check_decoded(v, 10, 8, times)
    # only the sampled frames were converted: 21 of 80
    assert v.frames_converted == 21 and v.frames.shape == (21, 32, 32, 3)


def test_long_video_spreads_num_frames_uniformly(videos):
    v = decode_video(videos["long"])  # 250 s > (384 - 1) / 2 s
    times = np.linspace(0, 250, 384)
    _check_decoded(v, 250, 4, times)
    assert len(v.frames) == 384 and v.frames_converted == len(set(expected_frames(times, 250, 4)))
    assert v.frames_converted < 1000  # never all frames


def test_sparse_sampling_seeks_to_the_right_frames(videos):
    v = decode_video(videos["long"], num_frames=8)  # 140 frames apart: decoding seeks between keyframes
    _check_decoded(v, 250, 4, np.linspace(0, 250, 8))
    assert v.frames_converted == 8 and v.frames_decoded < 8 * 20  # at most one keyframe interval per frame


def test_num_frames_and_resize_are_configurable(videos):
    v = decode_video(videos["short"], num_frames=16, resize_to=378)
    _check_decoded(v, 10, 8, np.linspace(0, 10, 16))
    assert v.frames.shape == (16, 378, 378, 3)


def test_sample_times_rule():
    np.testing.assert_allclose(sample_times(3.2), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.2])
    assert len(sample_times(191.5)) == 384 and sample_times(191.5)[-1] == 191.5
    np.testing.assert_allclose(sample_times(191.6), np.linspace(0, 191.6, 384))
    np.testing.assert_allclose(sample_times(100, num_frames=8), np.linspace(0, 100, 8))


def test_sample_indices_rule():
    # released index-based variant for decoded arrays
    np.testing.assert_array_equal(sample_indices(2, 30.0), [0, 1])
    np.testing.assert_array_equal(sample_indices(31, 30.0), [0, 15, 30])
    np.testing.assert_array_equal(sample_indices(40, 30.0), [0, 15, 30, 39])
    n = 30 * 300  # 300 s at 30 fps: uniform over the whole clip
    np.testing.assert_array_equal(sample_indices(n, 30.0), np.linspace(0, n - 1, 384).astype(int))


def test_frames_match_reference_video_processor(videos):
    from transformers import Molmo2VideoProcessor

    v = decode_video(videos["long"], num_frames=12)
    rs = np.random.RandomState(0)
    frames = np.clip(v.frames.astype(int) + rs.randint(-60, 60, v.frames.shape), 0, 255).astype(np.uint8)
    ref = Molmo2VideoProcessor(do_resize=True, do_rescale=True, do_normalize=True)
    ref_out = ref(videos=[frames], do_sample_frames=False, return_tensors="np")
    ours = preprocess_frames(frames, v.timestamps, VideoConfig())
    assert np.abs(ours.pixel_values - ref_out["pixel_values_videos"]).max() <= ONE_STEP
    np.testing.assert_array_equal(ours.pooling_idx, ref_out["video_token_pooling"])
    assert ours.pooling_idx.dtype == ref_out["video_token_pooling"].dtype
    assert list(ours.grid) == ref_out["video_grids"][0].tolist()
    np.testing.assert_array_equal(ours.pooling_idx[81], [729, 730, 731, 756, 757, 758, 783, 784, 785])


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p, good: p, "video file not found: {p}"),
        (lambda p, good: (p.write_bytes(b""), p)[1], "cannot decode video {p}: the file is empty"),
        (lambda p, good: (p.write_bytes(b"\x00\x01garbage" * 100), p)[1], "cannot decode video {p}"),
        (lambda p, good: (p.write_bytes(open(good, "rb").read()[:2000]), p)[1], "cannot decode video {p}"),
    ],
    ids=["missing", "zero-length", "corrupt", "truncated"],
)
def test_bad_videos(tmp_path, videos, make, expected):
    path = make(tmp_path / "bad.mp4", videos["short"])
    with pytest.raises(VideoDecodeError) as err:
        decode_video(path)
    msg = str(err.value)
    assert expected.format(p=path) in msg and "\n" not in msg


def test_bad_video_bytes():
    with pytest.raises(VideoDecodeError, match="videos\\[0\\]"):
        decode_video(b"not a video at all", name="videos[0]")
