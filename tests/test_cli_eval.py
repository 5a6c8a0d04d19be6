"""`molmo2-jax eval` on a tiny checkpoint over sets in the pixmo-points-eval and Molmo2-VideoPointEval
schemas: a killed run resumes where it stopped and ends with the predictions of an uninterrupted run."""

import json

import eval_fixtures as F
import numpy as np
import pytest
import torch
from ref_model import random_image, tokenizer_checkpoint

from molmo2_jax.cli import main
from molmo2_jax.evaluation import answering

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_ckpt")
    return path, tokenizer_checkpoint(path)


def _write_video(path, seed):
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = F.W, F.H, "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (F.H, F.W, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module", params=["pointing", "video_pointing"])
def dataset(request, tmp_path_factory):
    """(task, directory with test.json in the pixmo-points-eval or Molmo2-VideoPointEval schema + media)."""
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "pointing":
        rows, _ = F.pointing_set()
        rows = [dict(r, image=f"{n}.png") for n, r in enumerate(rows[:3])]
        for n in range(3):
            random_image(F.W, F.H, n).save(d / f"{n}.png")
    else:
        rows, _ = F.video_pointing_set()
        rows = [dict(r, video_id=f"video{n}") for n, r in enumerate(rows[:3])]
        for n in range(3):
            _write_video(d / f"video{n}.mp4", n)
    (d / "test.json").write_text(json.dumps(rows))
    return request.param, d


def _eval(checkpoint, dataset, out, capsys, *options):
    task, d = dataset
    checkpoint = checkpoint[0]
    code = main(["eval", "--checkpoint", str(checkpoint), "--task", task, "--data", str(d / "test.json"),
                 "--media", str(d), "--out", str(out), "--max-new-tokens", "6", *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_writes_answers_and_resumes_after_a_kill(checkpoint, dataset, tmp_path, capsys, monkeypatch):
    code, out, err = _eval(checkpoint, dataset, tmp_path / "full", capsys)
    assert code == 0 and "3/3" in err and "examples/s" in err
    full = (tmp_path / "full" / "predictions.jsonl").read_text()
    assert [json.loads(line)["id"] for line in full.splitlines()] == ["0", "1", "2"]
    assert json.loads((tmp_path / "full" / "metrics.json").read_text()) == json.loads(out)

    real_answer, asked = answering.answer, []

    def answer_then_die(model, processor, batch, **kwargs):  # killed while answering the second batch
        if asked:
            raise KeyboardInterrupt
        asked.extend(e.id for e in batch)
        return real_answer(model, processor, batch, **kwargs)

    # batches of 2 here, one batch of 3 in the uninterrupted run: the answers must not depend on the batching
    monkeypatch.setattr(answering, "answer", answer_then_die)
    code, _, _ = _eval(checkpoint, dataset, tmp_path / "killed", capsys, "--batch-size", "2")
    predictions = tmp_path / "killed" / "predictions.jsonl"
    assert code == 130 and not (tmp_path / "killed" / "metrics.json").exists()
    with predictions.open("a") as f:
        f.write('{"id": "2", "predic')  # a line cut off by the kill

    asked.clear()
    monkeypatch.setattr(answering, "answer", lambda model, processor, batch, **kwargs: asked.extend(
        e.id for e in batch) or real_answer(model, processor, batch, **kwargs))
    code, out, _ = _eval(checkpoint, dataset, tmp_path / "killed", capsys, "--batch-size", "2")
    assert code == 0 and asked == ["2"]  # only what the first run had not finished
    assert predictions.read_text() == full
    assert json.loads(out) == json.loads((tmp_path / "full" / "metrics.json").read_text())


def transformers_answers(checkpoint, rows, media, new_tokens):
    """Greedy answers of the reference model + processor (the prompt eval asks for pixmo-points-eval)."""
    from PIL import Image
    from ref_tokenizer import make_reference_processor

    path, model = checkpoint
    processor = make_reference_processor(path)
    out = []
    for row in rows:
        content = [{"type": "image"}, {"type": "text", "text": f"Point to {row['label']}\nPlease say "
                                                               "'There are none.' if it is not in the image."}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        image = Image.open(media / row["image"]).convert("RGB")
        inputs = processor(text=text, images=[image], return_tensors="pt", max_crops=24)
        inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        out.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def test_score_of_transformers_answers_equals_evals_own(checkpoint, dataset, tmp_path, capsys):
    task, d = dataset
    if task != "pointing":
        pytest.skip("the reference loop is run on the image set")
    code, out, _ = _eval(checkpoint, dataset, tmp_path / "ours", capsys)
    ours = [json.loads(line) for line in (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines()]
    rows = json.loads((d / "test.json").read_text())
    theirs = transformers_answers(checkpoint, rows, d, 6)
    assert [p["prediction"] for p in ours] == theirs  # the texts agree ...
    predictions = tmp_path / "transformers.jsonl"
    predictions.write_text("".join(json.dumps({"id": str(n), "prediction": t}) + "\n" for n, t in enumerate(theirs)))
    assert main(["score", "--task", "pointing", "--data", str(d / "test.json"), "--predictions", str(predictions),
                 "--media", str(d)]) == 0
    scored = json.loads(capsys.readouterr().out)
    own = json.loads(out)
    assert [scored[k] for k in ("precision", "recall", "f1")] == [own[k] for k in ("precision", "recall", "f1")]


def test_two_processes_give_the_predictions_of_one(checkpoint, dataset, tmp_path, capsys):
    """Two `eval` processes joined by jax.distributed (loopback coordinator) split the examples and end
    with the predictions and metrics of one process; a pair run again after a shorter run resumes."""
    import os
    import socket
    import subprocess
    import sys

    task, d = dataset
    if task != "pointing":
        pytest.skip("one schema is enough for the process split")
    _eval(checkpoint, dataset, tmp_path / "one", capsys)

    def run_pair(out, limit=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "molmo2_jax.cli", "eval", "--checkpoint", str(checkpoint[0]), "--task", task,
                "--data", str(d / "test.json"), "--media", str(d), "--out", str(out), "--max-new-tokens", "6",
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        argv += ["--limit", str(limit)] if limit else []
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        procs = [subprocess.Popen(argv + ["--process-id", str(k)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for k in (0, 1)]
        results = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results
        return results[0][0].strip().splitlines()[-1]  # gloo writes its own lines to stdout first

    run_pair(tmp_path / "two", limit=2)  # a first run that stops early: examples 0 and 1 answered
    assert (tmp_path / "two" / "predictions.1.jsonl").read_text().count("\n") == 1
    out = run_pair(tmp_path / "two")
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    assert json.loads(out) == json.loads((tmp_path / "one" / "metrics.json").read_text())


def test_a_mesh_over_the_processes_devices_gives_the_same_answers(checkpoint, dataset, tmp_path, capsys):
    """The model and each batch sharded over 2 (simulated) devices answer as one device does."""
    import os
    import subprocess
    import sys

    task, d = dataset
    if task != "pointing":
        pytest.skip("one schema is enough for the sharding")
    _eval(checkpoint, dataset, tmp_path / "one", capsys, "--batch-size", "2")
    argv = [sys.executable, "-m", "molmo2_jax.cli", "eval", "--checkpoint", str(checkpoint[0]), "--task", task,
            "--data", str(d / "test.json"), "--media", str(d), "--out", str(tmp_path / "mesh"),
            "--max-new-tokens", "6", "--batch-size", "2", "--mesh", "data=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mesh" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()



def test_video_count_clips_decide_what_the_model_sees(checkpoint, tmp_path, capsys):
    """Molmo2-VideoCountEval rows name a clip: eval shows only its frames, timed from its start (as Ai2's
    loader does), so the last 4 s of an 8 s video are answered as a file holding just those 4 s, and
    otherwise than the whole video. Clips outside the video are named by row id."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (16, F.H, F.W, 3), dtype=np.uint8)  # 8 s at 2 fps
    d = tmp_path / "data"
    d.mkdir()
    F.write_lossless_mp4(d / "full.mp4", frames)
    F.write_lossless_mp4(d / "second_half.mp4", frames[8:])
    rows, _ = F.video_count_set()
    row = dict(rows[0], video_duration=8.0)
    rows = [dict(row, id="late", video_id="full", clip_start=4.0, clip_end=8.0),
            dict(row, id="cut", video_id="second_half", clip_start=0.0, clip_end=4.0, video_duration=4.0),
            dict(row, id="whole", video_id="full", clip_start=0.0, clip_end=8.0),
            dict(row, id="after", video_id="full", clip_start=9.0, clip_end=12.0)]  # past the row's duration
    (d / "test.json").write_text(json.dumps(rows))
    argv = ["eval", "--checkpoint", str(checkpoint[0]), "--task", "video_count", "--data", str(d / "test.json"),
            "--media", str(d), "--max-new-tokens", "8"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "skipping row 3 (id after): clip 9.0-12.0 s is not inside the 8.0 s video" in err
    answers = {json.loads(line)["id"]: json.loads(line)["prediction"]
               for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()}
    assert answers["late"] == answers["cut"] != answers["whole"]

    # a row whose duration is wrong: the clip is past the end of the file itself
    (d / "test.json").write_text(json.dumps([dict(row, id="liar", video_id="full", video_duration=60.0,
                                                  clip_start=20.0, clip_end=30.0)]))
    assert main([*argv, "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "example liar: video" in err[0]
    assert "clip 20.0-30.0 s is not inside the 8.00 s video" in err[0]
    assert not (tmp_path / "bad" / "predictions.jsonl").read_text()


def test_tracking_takes_the_clips_frames_from_the_source_video(checkpoint, tmp_path, capsys, monkeypatch):
    """A VideoTrackEval row whose cut clip file is absent is answered from frames start_frame..end_frame of its
    source video, as the clip Ai2's download cuts from it: the model sees the cut file's frames and times."""
    import molmo2_jax.preprocessing as preprocessing

    shown, decode = [], preprocessing.decode_video
    monkeypatch.setattr(preprocessing, "decode_video", lambda *a, **k: shown.append(decode(*a, **k)) or shown[-1])
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (10, F.H, F.W, 3), dtype=np.uint8)  # 5 s at 2 fps
    d = tmp_path / "data"
    d.mkdir()
    F.write_lossless_mp4(d / "source.mp4", frames)
    F.write_lossless_mp4(d / "cut.mp4", frames[4:])
    rows, _ = F.tracking_set()
    rows = [dict(rows[0], id="from-cut", clip="cut", video="source", start_frame=4, end_frame=9),
            dict(rows[0], id="from-source", clip="absent", video="source", start_frame=4, end_frame=9),
            dict(rows[0], id="source-start", clip="absent", video="source", start_frame=0, end_frame=5)]
    (d / "test.json").write_text(json.dumps(rows))
    assert main(["eval", "--checkpoint", str(checkpoint[0]), "--task", "tracking", "--data", str(d / "test.json"),
                 "--media", str(d), "--max-new-tokens", "8", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    cut, source, start = shown[:3]  # one batch, in row order
    np.testing.assert_array_equal(cut.frames, source.frames)
    np.testing.assert_array_equal(cut.timestamps, source.timestamps)
    assert cut.timestamps.tolist() == [0.0, 1.0, 2.0, 3.0] and not np.array_equal(start.frames, source.frames)
    assert len(shown) == 3  # the batch filled to 8 rows reuses the last video, decoded once
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["prediction"] == json.loads(lines[1])["prediction"]
