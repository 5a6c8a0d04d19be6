"""The train step on 8 simulated devices (fsdp=4 x tensor=2, params and batch sharded) gives the loss, gradient
norm and updated params of the same step on one device. Runs in a subprocess: the device count must be set
before JAX starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(HERE))
    import tempfile

    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "molmo2-jax" / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    import test_training as T

    from molmo2_jax.params import flatten
    from molmo2_jax.sharding import make_mesh
    from molmo2_jax.training.loop import stack_micro_batches
    from molmo2_jax.training.step import make_train_step

    config = T.train_config(Path(tempfile.mkdtemp()), grad_accum=2)
    batch = stack_micro_batches([T.collate([T.example(i + 8 * a, i % 2 == a) for i in range(8)]) for a in range(2)])
    results = {}
    for name, mesh in (("one", make_mesh({}, jax.devices()[:1])), ("sharded", make_mesh({"fsdp": 4, "tensor": 2}))):
        ts = make_train_step(T.MODEL, config, mesh)
        state, metrics = ts.step(ts.init_state(0), batch)
        kernel = state["params"]["decoder"]["layers"]["q"]["kernel"]
        results[name] = (jax.device_get(metrics), jax.device_get(flatten(state["params"])), kernel.sharding.spec)
    (m1, p1, _), (m8, p8, spec) = results["one"], results["sharded"]
    assert tuple(spec) == (None, "fsdp", "tensor", None), spec
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for path in p1:  # Adam's first update is ~lr * sign(grad): compare to 1% of lr (1e-3)
        np.testing.assert_allclose(p8[path], p1[path], rtol=0, atol=1e-5, err_msg=path)
    print("OK")


@pytest.mark.slow
def test_sharded_step_matches_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    main()
