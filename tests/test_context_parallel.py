"""Context parallelism over the `sequence` mesh axis (model/attention.py `per_device`): on 8 simulated devices,
the tiny model of both families with `sequence=4` gives the logits and the gradient of every parameter of
`sequence=1`, in float32, on rows holding images, a video, two packed examples and padding; the attention really
gathers its keys over `sequence`; and a sequence length the axis does not divide is refused before compiling.

The 8-device cases run in a subprocess (this file executed as a script prints JSON): the device count is fixed
when JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FAMILIES = ("qwen3", "olmo3")
MESHES = {"sequence1": {"fsdp": 2}, "sequence4": {"fsdp": 2, "sequence": 4}}


def small_crops(batch, patches: int):
    """`batches.mixed_batch` (per-row crops of 729 patches) cut to crops of `patches`, pooling indices
    (local to the row) remapped."""
    import numpy as np

    from molmo2_jax.data.packing import MODEL_KEYS

    out = {k: v for k, v in batch.items() if k in MODEL_KEYS}
    for key in ("pixel_values", "pixel_values_videos"):
        out[key] = out[key][:, :, :patches]  # [rows, crops, patches, values]
    for key in ("image_token_pooling", "video_token_pooling"):
        idx = out[key]
        out[key] = np.where(idx >= 0, idx // 729 * patches + idx % 729 % patches, -1).astype(idx.dtype)
    return out


def _worker() -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "molmo2-jax" / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    from batches import mixed_batch, olmo3, rel_diff

    from molmo2_jax.config import load_preset
    from molmo2_jax.model.molmo2 import Molmo2
    from molmo2_jax.params import flatten, init_params
    from molmo2_jax.sharding import MeshError, activate, batch_shardings, make_mesh
    from molmo2_jax.training.config import TrainConfig
    from molmo2_jax.training.step import make_train_step

    results = {}
    for family in FAMILIES:
        # blockwise everywhere, with tiles of 8 rows: two per sequence shard of 16 tokens; crops of 4 x 4 patches
        # keep the ViT's tile loops short
        config = load_preset("tiny", ["vision.image_size=56"])
        config = (olmo3(config) if family == "olmo3" else config).replace(
            attention="blockwise", attention_block_q=8, attention_block_kv=8)
        batch = small_crops(mixed_batch(config), config.vision.num_patches)
        model = Molmo2(config)
        weights = np.random.default_rng(1).normal(size=(*batch["input_ids"].shape, config.text.vocab_size))
        params = jax.device_get(init_params(config))

        def loss(p, b, model=model, weights=jnp.asarray(weights, jnp.float32)):
            logits, _ = model.apply({"params": p}, **b)
            return jnp.sum(logits * weights * b["attention_mask"][..., None]), logits

        out = {}
        for case, spec in MESHES.items():
            mesh = make_mesh(spec, jax.devices()[:int(np.prod(list(spec.values())))])
            with activate(mesh):
                placed = init_params(config, mesh=mesh)  # the params' shardings, filled with the same values
                placed = jax.tree.map(lambda x, y: jax.device_put(y, x.sharding), placed, params)
                b = jax.device_put(batch, batch_shardings(mesh, batch))
                step = jax.jit(jax.grad(loss, has_aux=True))
                jaxpr = str(jax.make_jaxpr(step)(placed, b))
                grads, logits = jax.device_get(step(placed, b))
            gathered = "all_gather" in jaxpr and "axis_name=('sequence',)" in jaxpr.replace("axis_name=sequence",
                                                                                            "axis_name=('sequence',)")
            print(family, case, "done", file=sys.stderr, flush=True)
            out[case] = (flatten(nn.unbox(grads)), np.asarray(logits), gathered)
        (g1, l1, _), (g4, l4, gathered) = out["sequence1"], out["sequence4"]
        real = np.asarray(batch["attention_mask"]) > 0
        grads = {name: rel_diff(g4[name], g) for name, g in g1.items() if not name.endswith("k/bias")}
        # a key bias's true gradient is 0 (softmax ignores q.b_k): both sides hold rounding noise there
        noise = {name: float(max(np.abs(g4[name]).max(), np.abs(g).max())
                             / np.abs(g1[name.replace("k/bias", "q/bias")]).max())
                 for name, g in g1.items() if name.endswith("k/bias")}
        results[family] = {"logits": rel_diff(l4[real], l1[real]), "grads": grads, "key_bias_noise": noise,
                           "gathered": gathered, "params": len(g1)}
    # the train step refuses before tracing anything
    step = make_train_step(load_preset("tiny"), TrainConfig(), make_mesh({"fsdp": 2, "sequence": 4}))
    try:
        step.jit_step({"input_ids": jax.ShapeDtypeStruct((1, 2, 30), jnp.int32)})
        results["step_error"] = None
    except MeshError as e:
        results["step_error"] = str(e)
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE.parent))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULTS "):])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_four_equals_sequence_one(results, family):
    r = results[family]
    assert r["gathered"], "attention did not all-gather its keys over the sequence axis"
    assert r["logits"] <= 1e-5, r["logits"]
    worst = max(r["grads"].items(), key=lambda x: x[1])
    assert len(r["grads"]) + len(r["key_bias_noise"]) == r["params"]
    assert worst[1] <= 1e-5, worst
    assert max(r["key_bias_noise"].values(), default=0.0) <= 1e-5, r["key_bias_noise"]


# ----------------------------------------------------------------------------------------------------
# Bad input: a sequence length the axis does not divide, refused in one line before compiling


@pytest.mark.slow
def test_step_refuses_a_length_the_sequence_axis_does_not_divide(results):
    assert results["step_error"] == "sequence length 30 is not divisible by the sequence axis of the mesh (sequence=4)"


def test_plan_refuses_a_length_the_sequence_axis_does_not_divide():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, "-m", "molmo2_jax.cli", "plan", "--model", "tiny", "--mesh", "sequence=4",
                           "--batch", "1", "--seq", "30", "--crops", "1", "--tokens", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "molmo2-jax plan: error: --seq 30 is not divisible by the sequence axis of the mesh (sequence=4)"]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _worker()
