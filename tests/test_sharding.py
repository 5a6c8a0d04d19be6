"""Sharding on a device mesh: the rules table, fast errors for meshes that cannot work, and parity of a sharded
forward pass and training step with the single-device result on 8 simulated CPU devices.

The 8-device cases run in one subprocess (this file executed as a script prints JSON), because the device count
is fixed when JAX starts and the pytest process has one device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MESHES = {"data8": {"data": 8}, "fsdp8": {"fsdp": 8}, "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
          "f2t4": {"fsdp": 2, "tensor": 4}}
TINY_OVERRIDES = ["vision.image_size=56"]  # 4x4 patches per crop keeps the ViT cheap


def _worker() -> None:
    """Run every mesh case on 8 simulated devices; print one JSON line of results."""
    from jax_setup import configure

    jax = configure(devices=8)
    from batches import training_batch
    from jax.sharding import NamedSharding, PartitionSpec

    from molmo2_jax.config import load_preset
    from molmo2_jax.model.molmo2 import Molmo2
    from molmo2_jax.params import flatten, init_params, logical_names
    from molmo2_jax.sharding import activate, batch_shardings, logical_to_spec, make_mesh
    from molmo2_jax.training.loss import weighted_sums
    from molmo2_jax.training.step import MODEL_KEYS

    config = load_preset("tiny", TINY_OVERRIDES)
    module = Molmo2(config)
    batch = training_batch(config)

    def loss(params, b):
        logits = module.apply({"params": params}, **{k: b[k] for k in MODEL_KEYS if k in b})[0]
        sums = weighted_sums(logits, b["target_ids"], b["loss_weights"])
        return sums["ce"] / sums["weight"], logits

    # one compiled function per mesh: loss, logits and gradients of a training step
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ref_params = init_params(config)
    (ref_loss, ref_logits), ref_grads = jax.device_get(step(ref_params, batch))
    names = logical_names(config)
    leaves = jax.tree_util.tree_leaves
    diff = lambda a, r: max(float(np.max(np.abs(np.asarray(x) - y))) for x, y in zip(leaves(a), leaves(r)))
    scale = lambda r: max(float(np.max(np.abs(y))) for y in leaves(r))
    results = {}
    for case, spec in MESHES.items():
        mesh = make_mesh(spec)
        with activate(mesh):
            params = init_params(config, mesh=mesh)  # born sharded
            (got_loss, logits), grads = step(params, jax.device_put(batch, batch_shardings(mesh, batch)))
        wrong = [p for p, x in flatten(params).items()
                 if not x.sharding.is_equivalent_to(NamedSharding(mesh, logical_to_spec(names[p])), x.ndim)]
        logits_spec = PartitionSpec(("data", "fsdp"), "sequence", "tensor")
        results[case] = {
            "init": diff(params, ref_params), "logits": diff(logits, ref_logits), "logits_scale": scale(ref_logits),
            "grads": diff(grads, ref_grads), "grads_scale": scale(ref_grads),
            "loss": abs(float(got_loss) - float(ref_loss)), "wrong_param_shardings": wrong,
            "logits_sharded": logits.sharding.is_equivalent_to(NamedSharding(mesh, logits_spec), 3),
        }
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def mesh_results():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULTS "):])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MESHES))
def test_sharded_forward_and_step_match_single_device(mesh_results, case):
    r = mesh_results[case]
    assert r["init"] == 0.0, "params born sharded differ from the single-device init"
    assert r["wrong_param_shardings"] == []
    assert r["logits_sharded"], "activation constraints did not shard the logits over batch and vocab"
    assert r["logits"] <= 1e-5 * max(1.0, r["logits_scale"]), r
    assert r["grads"] <= 1e-5 * max(1.0, r["grads_scale"]), r
    assert r["loss"] <= 1e-5, r


# ----------------------------------------------------------------------------------------------------
# Rules table and fast errors (no devices needed: abstract meshes)


def _abstract_mesh(**sizes):
    from jax.sharding import AbstractMesh, AxisType

    from molmo2_jax.sharding import MESH_AXES

    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 4)


@pytest.mark.parametrize("preset,mesh", [("molmo2-4b", {"fsdp": 8}), ("molmo2-8b", {"fsdp": 2, "tensor": 4}),
                                         ("molmo2-o-7b", {"data": 2, "fsdp": 2, "tensor": 2}),
                                         ("molmo2-8b", {"fsdp": 64})])
def test_no_large_param_left_replicated(preset, mesh):
    """With fsdp > 1 every param over 1 MB is split over at least one mesh axis."""
    import jax.numpy as jnp

    from molmo2_jax.config import load_preset
    from molmo2_jax.params import check_config, logical_names, param_shapes
    from molmo2_jax.sharding import logical_to_spec

    config = load_preset(preset)
    abstract = _abstract_mesh(**mesh)
    check_config(config, abstract)
    shapes = param_shapes(config)
    for path, names in logical_names(config).items():
        nbytes = math.prod(shapes[path]) * jnp.dtype(config.param_dtype).itemsize
        split = math.prod(abstract.shape[a] for axes in logical_to_spec(names) if axes
                          for a in ((axes,) if isinstance(axes, str) else axes))
        assert nbytes <= 2**20 or split > 1, f"{path} ({nbytes} bytes) is fully replicated on {mesh}"


@pytest.mark.parametrize("preset,total", [("molmo2-4b", 4_850_869_200), ("molmo2-8b", 8_661_703_120),
                                          ("molmo2-o-7b", 7_760_786_896)])
def test_preset_parameter_counts_match_the_spec(preset, total):
    from molmo2_jax.config import load_preset
    from molmo2_jax.params import param_shapes

    assert sum(math.prod(s) for s in param_shapes(load_preset(preset)).values()) == total


def test_rules_table_rejects_collisions_and_unknown_names():
    from molmo2_jax.sharding import MeshError, check_table, logical_to_spec

    assert tuple(logical_to_spec(("layers", "embed", "heads", "head_dim"))) == (None, ("fsdp", "sequence"), "tensor",
                                                                                     None)
    with pytest.raises(MeshError, match="both map to mesh axis 'fsdp'"):
        logical_to_spec(("embed", "vit_embed"))
    with pytest.raises(MeshError, match="no sharding rule"):
        logical_to_spec(("embed", "nonsense"))
    with pytest.raises(MeshError, match="twice"):
        check_table((("embed", "fsdp"), ("embed", "tensor")))
    with pytest.raises(MeshError, match="unknown mesh axes"):
        check_table((("embed", "model"),))


def test_mesh_errors_name_the_problem():
    from molmo2_jax.config import load_preset
    from molmo2_jax.params import check_config
    from molmo2_jax.sharding import MeshError, make_mesh, parse_mesh

    assert parse_mesh("fsdp=64,tensor=2") == {"fsdp": 64, "tensor": 2}
    with pytest.raises(MeshError, match="has 16 devices but 1 are available"):
        make_mesh("fsdp=8,tensor=2")
    with pytest.raises(MeshError, match="'model=2' is not AXIS=SIZE"):
        parse_mesh("model=2")
    with pytest.raises(MeshError, match=r"text.num_kv_heads = 8 is not divisible by the tensor axis .*tensor=16"):
        check_config(load_preset("molmo2-4b"), _abstract_mesh(tensor=16))
    with pytest.raises(MeshError, match="lm_head dim 100278"):  # O-7B's vocabulary is only even
        check_config(load_preset("molmo2-o-7b"), _abstract_mesh(tensor=4))


@dataclasses.dataclass(frozen=True)
class _SliceDevice:
    """Stands in for a TPU device of a multi-slice job: only what a mesh layout reads."""

    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


@pytest.mark.parametrize("shape,spans", [
    ((2, 4, 1, 1), (2, 1, 1, 1)),  # data over the slices
    ((1, 8, 1, 1), (1, 2, 1, 1)),  # no data axis: fsdp spans them
    ((2, 2, 1, 2), (2, 1, 1, 1)),
    ((1, 2, 2, 2), (1, 2, 1, 1)),  # sequence and tensor stay within a slice
])
def test_slices_split_data_then_fsdp(shape, spans):
    from molmo2_jax.sharding import multislice_grid, num_slices

    # listed with the slices interleaved, as a device list need not group them: the layout must
    devices = [_SliceDevice(i, i // 4) for i in sorted(range(8), key=lambda i: (i % 4, i // 4))]
    assert num_slices(devices) == 2
    slices = np.vectorize(lambda d: d.slice_index)(multislice_grid(shape, devices))
    assert slices.shape == shape
    for axis, across in enumerate(spans):  # an axis spans both slices exactly when it should
        varies = (np.diff(slices, axis=axis) != 0).any() if shape[axis] > 1 else False
        assert varies == (across > 1), (axis, slices)
    # each slice holds one contiguous block of the data x fsdp grid: the slower links carry only those axes
    assert all(len(np.unique(block)) == 1 for block in slices.reshape(spans[0], -1, spans[1], shape[1] // spans[1],
                                                                       *shape[2:]).swapaxes(1, 2).reshape(2, -1))


def test_fsdp_across_slices_is_warned_of():
    from molmo2_jax.sharding import fsdp_across_slices, multislice_grid

    devices = [_SliceDevice(i, i // 4) for i in range(8)]
    assert fsdp_across_slices(multislice_grid((2, 4, 1, 1), devices)) is None
    assert fsdp_across_slices(multislice_grid((1, 8, 1, 1), devices)) == (
        "warning: fsdp spans 2 of the 2 TPU slices, so each layer's weight gathers cross the network between "
        "slices; data=2 in the mesh keeps fsdp within a slice")
    assert fsdp_across_slices(np.asarray(devices[:4]).reshape(1, 4, 1, 1)) is None  # one slice


def test_slices_that_cannot_split_the_mesh_are_one_line():
    from molmo2_jax.sharding import MeshError, multislice_grid

    devices = [_SliceDevice(i, i // 2) for i in range(8)]  # 4 slices of 2
    with pytest.raises(MeshError, match=r"mesh data=2,fsdp=1,sequence=1,tensor=4 cannot be split between 4 TPU "
                                        r"slices: data x fsdp must be a multiple of 4"):
        multislice_grid((2, 1, 1, 4), devices)


def test_cache_shardings_follow_the_rules():
    from molmo2_jax.config import load_preset
    from molmo2_jax.model.kv_cache import shardings as cache_shardings

    mesh = _abstract_mesh(data=2, fsdp=2, tensor=2)
    shardings = cache_shardings(load_preset("tiny"), mesh, batch=4, max_length=64)
    assert {tuple(s.spec) for s in shardings.k + shardings.v} == {(("data", "fsdp"), "tensor", "sequence", None)}
    assert tuple(shardings.seg.spec) == (("data", "fsdp"), "sequence")
    single = cache_shardings(load_preset("tiny"), mesh, batch=1, max_length=64)  # a batch of 1 stays whole
    assert tuple(single.k[0].spec) == (None, "tensor", "sequence", None)


if __name__ == "__main__":
    _worker()
