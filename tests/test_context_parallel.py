"""Context parallelism over the `sequence` mesh axis (model/attention.py `per_device`): on 8 simulated devices,
the tiny model of both families with `sequence=4`, in natural and in zigzag order (`context_balance`,
model/zigzag.py), gives the logits, the prompt's keys/values and the gradient of every parameter of `sequence=1`,
in float32, on rows holding images, a video, two packed examples and padding; the attention really gathers its
keys over `sequence`, and in zigzag order each shard's queries are chunks i and 2S-1-i and its gathered keys are
back in natural order; the zigzag moves are two collective permutes for S = 2, 4, 8; and a sequence length the
axis does not divide is refused before compiling.

The 8-device cases run in a subprocess (this file executed as a script prints JSON): the device count is fixed
when JAX starts."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FAMILIES = ("qwen3", "olmo3")
# case -> (mesh, context_balance)
CASES = {"sequence1": ({"fsdp": 2}, None), "sequence4": ({"fsdp": 2, "sequence": 4}, None),
         "zigzag4": ({"fsdp": 2, "sequence": 4}, "zigzag")}


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


def _zigzag_moves(jax, np) -> dict:
    """For S = 2, 4, 8 (rows over the rest of the 8 devices): whether `to_zigzag` puts chunks i and 2S-1-i on
    shard i, `from_zigzag` undoes it (values and gradient), and the collectives of the compiled move."""
    import re

    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from molmo2_jax.model import zigzag
    from molmo2_jax.sharding import activate, make_mesh

    out = {}
    COLLECTIVES = r"(all-gather|collective-permute|all-to-all|all-reduce|reduce-scatter)(?:-start)?\("
    for s in (2, 4, 8):
        mesh = make_mesh({"fsdp": 8 // s, "sequence": s})
        length = 2 * s * 3
        x = np.arange(8 * length * 5, dtype=np.float32).reshape(8, length, 5)
        placed = jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp", "sequence", None)))
        with activate(mesh):
            move = jax.jit(lambda a, s=s: zigzag.to_zigzag(a, s))
            hlo = move.lower(placed).compile().as_text()
            moved = move(placed)
            back = jax.jit(lambda a, s=s: zigzag.from_zigzag(a, s))(moved)
            # the move is linear: its gradient is the inverse move of the cotangent
            grad = jax.jit(jax.grad(lambda a, s=s, w=jnp.asarray(x): jnp.sum(zigzag.to_zigzag(a, s) * w)))(placed)
            skipped = zigzag.shards(length + s)  # s divides it, 2s does not
        chunk = length // (2 * s)
        local_ok = all(
            np.array_equal(np.asarray(shard.data), np.concatenate(
                [x[shard.index[0], c * chunk:(c + 1) * chunk] for c in (i, 2 * s - 1 - i)], axis=1))
            for shard in moved.addressable_shards for i in [shard.index[1].start // (2 * chunk)])
        order = zigzag.chunk_order(s)
        inverse = x.reshape(8, 2 * s, chunk, 5)[:, np.argsort(order)].reshape(x.shape)
        out[s] = {"local": local_ok, "roundtrip": bool(np.array_equal(np.asarray(back), x)),
                  "grad": bool(np.array_equal(np.asarray(grad), inverse)), "skipped": skipped,
                  "collectives": sorted(re.findall(COLLECTIVES, hlo))}
    return out


def _record_local_slots(attention_module, jax):
    """Wrap the blockwise kernel to record, per call and device, the `sequence` shard and row 0's query and key
    slots it sees; returns the list the records go to and a function that unwraps the kernel."""
    import numpy as np

    records = []
    kernel = attention_module.blockwise_attention

    def recording(q, k, v, mask, **kw):
        if mask is not None:  # the ViT's calls come without one
            jax.debug.callback(lambda *a: records.append(tuple(map(np.asarray, a))),
                               jax.lax.axis_index("sequence"), mask.q_idx[0], mask.k_idx[0])
        return kernel(q, k, v, mask, **kw)

    attention_module.blockwise_attention = recording
    return records, lambda: setattr(attention_module, "blockwise_attention", kernel)


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
    from molmo2_jax.model import attention, zigzag
    from molmo2_jax.model.molmo2 import Molmo2
    from molmo2_jax.params import flatten, init_params
    from molmo2_jax.sharding import MeshError, activate, batch_shardings, make_mesh
    from molmo2_jax.training.config import TrainConfig
    from molmo2_jax.training.step import make_train_step

    results = {"moves": _zigzag_moves(jax, np)}
    print("moves done", file=sys.stderr, flush=True)
    for family in FAMILIES:
        # blockwise everywhere, with tiles of 8 rows: two per sequence shard of 16 tokens; crops of 4 x 4 patches
        # keep the ViT's tile loops short
        config = load_preset("tiny", ["vision.image_size=56"])
        config = (olmo3(config) if family == "olmo3" else config).replace(
            attention="blockwise", attention_block_q=8, attention_block_kv=8)
        batch = small_crops(mixed_batch(config), config.vision.num_patches)
        weights = np.random.default_rng(1).normal(size=(*batch["input_ids"].shape, config.text.vocab_size))
        params = jax.device_get(init_params(config))
        length = batch["input_ids"].shape[1]

        def loss(p, b, model, weights=jnp.asarray(weights, jnp.float32)):
            logits, kv = model.apply({"params": p}, **b, return_kv=True)
            return jnp.sum(logits * weights * b["attention_mask"][..., None]), (logits, kv)

        out = {}
        for case, (spec, balance) in CASES.items():
            model = Molmo2(config.replace(context_balance=balance))
            mesh = make_mesh(spec, jax.devices()[:int(np.prod(list(spec.values())))])
            records, restore = _record_local_slots(attention, jax)
            try:
                with activate(mesh):
                    placed = init_params(config, mesh=mesh)  # the params' shardings, filled with the same values
                    placed = jax.tree.map(lambda x, y: jax.device_put(y, x.sharding), placed, params)
                    b = jax.device_put(batch, batch_shardings(mesh, batch))
                    step = jax.jit(jax.grad(functools.partial(loss, model=model), has_aux=True))
                    jaxpr = str(jax.make_jaxpr(step)(placed, b))
                    grads, (logits, kv) = jax.device_get(step(placed, b))
                    jax.effects_barrier()
            finally:
                restore()
            gathered = "all_gather" in jaxpr and "axis_name=('sequence',)" in jaxpr.replace("axis_name=sequence",
                                                                                            "axis_name=('sequence',)")
            # each sequence shard's query slots (as chunk numbers of 2S chunks) and whether its keys were in order
            shards = {}
            for shard, q_idx, k_idx in records:
                if len(k_idx) != length:  # the ViT's and the connector's calls
                    continue
                shards.setdefault(int(shard), set()).add(
                    (tuple(sorted(set((q_idx // (length // 8)).tolist()))), bool(np.array_equal(k_idx,
                                                                                             np.arange(length)))))
            print(family, case, "done", file=sys.stderr, flush=True)
            out[case] = (flatten(nn.unbox(grads)), np.asarray(logits), [np.asarray(a) for a in kv], gathered,
                         {i: sorted(map(list, v)) for i, v in shards.items()})
        g1, l1, kv1, _, _ = out["sequence1"]
        real = np.asarray(batch["attention_mask"]) > 0
        results[family] = {"params": len(g1)}
        for case in ("sequence4", "zigzag4"):
            g4, l4, kv4, gathered, shards = out[case]
            grads = {name: rel_diff(g4[name], g) for name, g in g1.items() if not name.endswith("k/bias")}
            # a key bias's true gradient is 0 (softmax ignores q.b_k): both sides hold rounding noise there
            noise = {name: float(max(np.abs(g4[name]).max(), np.abs(g).max())
                                 / np.abs(g1[name.replace("k/bias", "q/bias")]).max())
                     for name, g in g1.items() if name.endswith("k/bias")}
            kv_diff = max(rel_diff(a[:, real], b[:, real]) for a, b in zip(kv4, kv1))
            results[family][case] = {"logits": rel_diff(l4[real], l1[real]), "kv": kv_diff, "grads": grads,
                                     "key_bias_noise": noise, "gathered": gathered, "shards": shards}
        results[family]["applies"] = zigzag.shards(length)  # no mesh here: 0
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
@pytest.mark.parametrize("case", ["sequence4", "zigzag4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_four_equals_sequence_one(results, family, case):
    r = results[family][case]
    assert r["gathered"], "attention did not all-gather its keys over the sequence axis"
    assert r["logits"] <= 1e-5, r["logits"]
    assert r["kv"] <= 1e-5, r["kv"]
    worst = max(r["grads"].items(), key=lambda x: x[1])
    assert len(r["grads"]) + len(r["key_bias_noise"]) == results[family]["params"]
    assert worst[1] <= 1e-5, worst
    assert max(r["key_bias_noise"].values(), default=0.0) <= 1e-5, r["key_bias_noise"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_zigzag_shards_hold_chunks_i_and_mirror(results, family):
    """What the attention kernel saw on each `sequence` shard (every layer, every device): its queries' slots as
    chunks of 8, and whether the gathered keys were in natural order."""
    natural = results[family]["sequence4"]["shards"]
    zigzag = results[family]["zigzag4"]["shards"]
    assert natural == {str(i): [[[2 * i, 2 * i + 1], True]] for i in range(4)}
    assert zigzag == {str(i): [[[i, 7 - i], True]] for i in range(4)}


@pytest.mark.slow
def test_zigzag_moves(results):
    for s, r in results["moves"].items():
        assert r["local"] and r["roundtrip"] and r["grad"], (s, r)
        assert r["collectives"] == ["collective-permute"] * 2, (s, r["collectives"])
        assert r["skipped"] == 0, s  # a length 2S does not divide runs in natural order


# ----------------------------------------------------------------------------------------------------
# Bad input: a sequence length the axis does not divide, refused in one line before compiling


@pytest.mark.slow
def test_step_refuses_a_length_the_sequence_axis_does_not_divide(results):
    assert results["step_error"] == "sequence length 30 is not divisible by the sequence axis of the mesh (sequence=4)"


def test_context_balance_must_be_known():
    from molmo2_jax.config import load_preset
    from molmo2_jax.errors import Molmo2Error

    with pytest.raises(Molmo2Error, match=r"^context_balance 'ring' is not one of \[None, 'zigzag'\]$"):
        load_preset("tiny", ["context_balance=ring"])


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
