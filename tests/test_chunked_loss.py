"""The chunked LM-head loss (`loss_chunk_tokens`, training/loss.py) equals the plain one in float32: the step's
loss and metrics (ce, z, weight, accuracy) and the gradient of every param, for a Qwen3-style and an Olmo3-style
tiny model, on micro-batches with images, a video, packed and padded rows, with gradient accumulation, on one
device and on sharded meshes of 8 simulated devices (a subprocess: the device count is fixed when JAX starts).
The chunked program never builds the `[B, T, vocab]` logits; a chunk size that does not fit is refused in one line
before anything compiles."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from batches import mixed_rows, multimodal_example, olmo3

from molmo2_jax.config import load_preset
from molmo2_jax.data.packing import MODEL_KEYS, assemble
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.params import flatten, init_params
from molmo2_jax.preprocessing.collate import Bucket
from molmo2_jax.sharding import make_mesh
from molmo2_jax.training.config import TrainConfigError, parse_train_config
from molmo2_jax.training.step import make_train_step

HERE = Path(__file__).parent
ROWS, SEQ = 4, 64
CHUNK = 16  # tokens per device: 16 chunks of 4 rows x 4 tokens on one device, 4 chunks on each mesh below
MESHES = {"fsdp_tensor_sequence": {"fsdp": 2, "tensor": 2, "sequence": 2},
          "data_fsdp_tensor": {"data": 2, "fsdp": 2, "tensor": 2}}
RTOL = 1e-5
METRICS = ("loss", "ce_loss", "z_loss", "accuracy", "loss_weight", "grad_norm")
# zero in exact arithmetic (a key bias shifts every score of a query alike): compared to the largest gradient
ZERO_GRADIENTS = ("vision/blocks/k/bias", "connector/k/bias")


def model_config(family: str):
    config = load_preset("tiny")
    return olmo3(config) if family == "olmo3" else config


@functools.cache
def micro_batches(family: str) -> dict[str, np.ndarray]:
    """Two micro-batches `[2, ...]` of 4 rows x 64 tokens: two images; a three-frame video; two packed examples
    with an image each; a short example and padding. The second holds the same examples in reverse row order.
    Half the targets are the untrained model's own top-1 prediction, so `accuracy` counts real hits."""
    config = model_config(family)
    rng, tok = np.random.default_rng(0), config.tokens
    rows = mixed_rows(rng, tok) + [[multimodal_example(rng, tok, [("text", 3), ("image", 5), ("text", 6)])]]
    bucket = Bucket(seq_len=SEQ, max_crops=6, max_image_tokens=40, max_frames=4, max_video_tokens=18)
    params, apply = init_params(config, 0), jax.jit(Molmo2(config).apply)
    micro = []
    for order in (rows, rows[::-1]):
        batch = assemble(order, bucket, patches_per_crop=729, patch_dim=588, pad_token_id=tok.pad)
        logits, _ = apply({"params": params}, **{k: batch[k] for k in MODEL_KEYS if k in batch})
        hits = (np.arange(SEQ) % 2 == 0) & (batch["loss_weights"] > 0)
        batch["target_ids"] = np.where(hits, np.argmax(np.asarray(logits), -1), batch["target_ids"]).astype(np.int32)
        micro.append(batch)
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def train_config(chunk: int):
    return parse_train_config({"model": {"preset": "tiny"}, "grad_accum": 2, "loss_chunk_tokens": chunk,
                               "optimizer": {g: {"warmup_steps": 0, "lr": 1e-3} for g in ("connector", "vit", "llm")}})


def results(config, chunk: int, mesh, batch, step: bool = True) -> tuple[dict, dict, str]:
    """The loss sums and gradients `TrainStep.gradients` gives (with the metrics of one step when `step`), and the
    gradients' StableHLO."""
    ts = make_train_step(config, train_config(chunk), mesh)
    state = ts.init_state(0)
    placed = ts.place_batch(batch)
    with ts.context():
        lowered = jax.jit(ts.gradients).lower(state["params"], placed)
        grads, sums = lowered.compile()(state["params"], placed)
    sums = jax.device_get(sums)
    if step:
        sums |= jax.device_get(ts.step(state, batch)[1])
    return sums, jax.device_get(flatten(grads)), lowered.as_text()


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict], what: str) -> None:
    (m1, g1), (m0, g0) = got, want
    assert m0["correct"] > 0 and m0["z"] > 0, "the batch must exercise the accuracy and the z-loss"
    for key in m0:
        if not key.startswith("lr/"):
            np.testing.assert_allclose(m1[key], m0[key], rtol=RTOL, err_msg=f"{what}: {key}")
    assert set(g1) == set(g0)
    largest = max(np.max(np.abs(g)) for g in g0.values())
    for path, want_grad in g0.items():
        scale = largest if path in ZERO_GRADIENTS else np.max(np.abs(want_grad))
        assert scale > 0, f"{what}: {path} has no gradient"
        np.testing.assert_allclose(g1[path], want_grad, rtol=0, atol=RTOL * scale, err_msg=f"{what}: grad {path}")


@pytest.mark.parametrize("family", ["qwen3", "olmo3"])
def test_chunked_loss_equals_plain_loss_on_one_device(family):
    config, batch = model_config(family), micro_batches(family)
    mesh = make_mesh({}, jax.devices()[:1])
    m0, g0, plain = results(config, 0, mesh, batch)
    m1, g1, chunked = results(config, CHUNK, mesh, batch)
    assert set(METRICS) <= set(m0)  # the step's metrics, beside the sums they come from
    assert_same((m1, g1), (m0, g0), family)
    vocab = config.text.vocab_size
    full, chunk = f"tensor<{ROWS}x{SEQ}x{vocab}xf32>", f"tensor<{ROWS}x{CHUNK // ROWS}x{vocab}xf32>"
    assert full in plain  # the plain loss takes the whole fp32 logits ...
    assert full not in chunked  # ... the chunked one never builds them,
    assert chunk in chunked  # only one chunk's at a time


def main() -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(HERE))
    from jax_setup import configure

    jax = configure(devices=8)
    for family in ("qwen3", "olmo3"):
        config, batch = model_config(family), micro_batches(family)
        m0, g0, _ = results(config, 0, make_mesh({}, jax.devices()[:1]), batch, step=False)
        for name, spec in MESHES.items():
            m1, g1, _ = results(config, CHUNK, make_mesh(spec), batch, step=False)
            assert_same((m1, g1), (m0, g0), f"{family} on {name}")
            print(f"{family} on {name}: equal", flush=True)
    print("OK")


@pytest.mark.slow
def test_chunked_loss_on_sharded_meshes_equals_plain_loss_on_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_bad_chunk_sizes_are_refused_in_one_line_before_compiling():
    with pytest.raises(TrainConfigError, match=r"^loss_chunk_tokens must be >= 0 .*-8$"):
        train_config(-8)
    config = model_config("qwen3")
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in micro_batches("qwen3").items()}
    for chunk in (24, 4 * 128, 3):  # not rows x a divisor of 64; more than the device holds; not a multiple of rows
        ts = make_train_step(config, train_config(chunk), make_mesh({}, jax.devices()[:1]))
        with ts.context(), pytest.raises(TrainConfigError) as e:
            ts.jit_step(spec).lower(ts.abstract_state(), spec, ts.abstract_base())
        assert str(e.value).startswith(f"loss_chunk_tokens={chunk} does not fit a device's 4 row(s) x 64 tokens")
        assert "\n" not in str(e.value)


if __name__ == "__main__":
    main()


def test_plan_counts_one_chunk_of_logits_when_the_loss_is_chunked():
    """`plan`'s analytic estimate: with the chunked loss the logits term is that of one chunk (plus the kept
    log-sum-exp), everything else unchanged. From abstract shapes: nothing compiles."""
    from molmo2_jax.plan import Workload, abstract_batch, estimate

    config, mesh, work = model_config("qwen3"), make_mesh({}, jax.devices()[:1]), Workload(4, 512, 1, 100)
    ts = make_train_step(config, train_config(0), mesh)
    state = ts.abstract_state()
    abstract = {"params": state["params"], "opt_state": state["opt_state"], "batch": abstract_batch(config, work)}
    plain, chunked = (estimate(config, mesh, work, abstract, chunk) for chunk in (0, 4 * 64))
    assert plain.logits > 7 * chunked.logits  # 2048 tokens vs a chunk of 256 (and 2048 kept lse values)
    assert plain.total - plain.logits == chunked.total - chunked.logits
