"""The train step on 8 simulated devices gives the loss, gradients and updated params of the same step on one
device: with params and batch sharded (fsdp=4 x tensor=2), and with the sequence axis split as well
(data=2 x fsdp=2 x sequence=2). Runs in a subprocess: the device count must be set before JAX starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
MESHES = {"sharded": {"fsdp": 4, "tensor": 2}, "sequence": {"data": 2, "fsdp": 2, "sequence": 2}}


def main() -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(HERE))
    import tempfile

    import numpy as np
    from jax_setup import configure

    jax = configure(devices=8)
    import test_training as T

    from molmo2_jax.params import flatten
    from molmo2_jax.sharding import batch_shardings, make_mesh
    from molmo2_jax.training.loop import stack_micro_batches
    from molmo2_jax.training.loss import weighted_sums
    from molmo2_jax.training.step import MODEL_KEYS, make_train_step

    config = T.train_config(Path(tempfile.mkdtemp()), grad_accum=2)
    batch = stack_micro_batches([T.collate([T.example(i + 8 * a, i % 2 == a) for i in range(8)]) for a in range(2)])
    micro = {k: v[0] for k, v in batch.items()}

    def loss(ts, params, mb):
        logits, _ = ts.module.apply({"params": params}, **{k: mb[k] for k in MODEL_KEYS if k in mb})
        sums = weighted_sums(logits, mb["target_ids"], mb["loss_weights"])
        return sums["ce"] / sums["weight"]

    results = {}
    for name, mesh in (("one", make_mesh({}, jax.devices()[:1])),
                       *((name, make_mesh(spec)) for name, spec in MESHES.items())):
        ts = make_train_step(T.MODEL, config, mesh)
        state = ts.init_state(0)
        with ts.context():  # gradients of one micro-batch, with the step's param and batch shardings
            grad_fn = jax.jit(lambda p, mb, ts=ts: jax.grad(loss, argnums=1)(ts, p, mb),
                              in_shardings=(ts.param_shardings, batch_shardings(mesh, micro)),
                              out_shardings=ts.param_shardings)
            grads = jax.device_get(flatten(grad_fn(state["params"], micro)))
        if name == "sequence":  # the activations really are split along the sequence
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
            with ts.context():
                text = ts.jit_step(spec).lower(ts.abstract_state(), spec, {}).as_text()
            assert '[{"data", "fsdp"}, {"sequence"}, {}]' in text
        state, metrics = ts.step(state, batch)
        kernel = state["params"]["decoder"]["layers"]["q"]["kernel"]
        results[name] = (jax.device_get(metrics), jax.device_get(flatten(state["params"])), kernel.sharding.spec,
                         grads)
    m1, p1, _, g1 = results["one"]
    largest = max(np.max(np.abs(g)) for g in g1.values())
    assert tuple(results["sharded"][2]) == (None, ("fsdp", "sequence"), "tensor", None), results["sharded"][2]
    for name in MESHES:
        m8, p8, _, g8 = results[name]
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5, err_msg=name)
        for path in p1:  # gradients to 1e-5 of the largest one (some, e.g. key biases, are ~0 up to rounding)
            np.testing.assert_allclose(g8[path], g1[path], rtol=0, atol=1e-5 * largest, err_msg=f"{name} grad {path}")
            # Adam's first update is ~lr * sign(grad): compare to 1% of lr (1e-3)
            np.testing.assert_allclose(p8[path], p1[path], rtol=0, atol=1e-5, err_msg=f"{name} {path}")
    print("OK")


@pytest.mark.slow
def test_sharded_step_matches_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    main()
