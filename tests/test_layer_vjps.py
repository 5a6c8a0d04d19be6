"""The custom backwards of model/layers.py against autodiff of the plain expressions they replace: `swiglu`
(`silu(gate) * up`) over the range where silu's slope changes sign and saturates, `project` (`tensordot(x, kernel)`)
over one and two contracted dims and several leading dims, both inside a jitted scan, dtypes kept in bfloat16, and
what the remat policies save of a projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from molmo2_jax.model.layers import project, remat_policy, swiglu


def plain(gate, up):
    return jax.nn.silu(gate) * up


def test_gradients_equal_autodiff_of_the_plain_expression():
    rng = np.random.default_rng(0)
    # gate spans silu's minimum (near -1.28, where its slope is 0), both tails and zero
    gate = jnp.asarray(np.concatenate([np.linspace(-12, 12, 97), rng.normal(0, 3, 159)]).reshape(4, 64), jnp.float32)
    up = jnp.asarray(rng.normal(size=gate.shape), jnp.float32)
    dy = jnp.asarray(rng.normal(size=gate.shape), jnp.float32)
    out, vjp = jax.vjp(swiglu, gate, up)
    want_out, want_vjp = jax.vjp(plain, gate, up)
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-7)
    for got, want in zip(vjp(dy), want_vjp(dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("x_shape", "kernel_shape", "contract"), [
    ((2, 5, 8), (8, 6), 1),  # [B, T, D] @ [D, F]
    ((3, 8), (8, 2, 4), 1),  # into heads x head_dim (q/k/v)
    ((2, 5, 2, 4), (2, 4, 6), 2),  # from heads x head_dim (o)
    ((8,), (8, 3), 1),  # no leading dims
    # many tokens into few features: the kernel gradient is taken transposed, then transposed back
    ((2, 50, 16), (16, 2), 1),
    ((2, 50, 16), (16, 2, 2), 1),
    ((2, 50, 2, 8), (2, 8, 3), 2),
])
def test_project_gradients_equal_autodiff_of_tensordot(x_shape, kernel_shape, contract):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    out, vjp = jax.vjp(lambda x, k: project(x, k, contract), x, kernel)
    want_out, want_vjp = jax.vjp(lambda x, k: jnp.tensordot(x, k, axes=contract), x, kernel)
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    dy = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    for got, want in zip(vjp(dy), want_vjp(dy), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_under_jit_and_scan():
    """As the decoder uses them: a jitted scan over layers of `down(swiglu(gate(x), up(x)))`."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(0, 0.3, (3, 2, 8, 16)), jnp.float32)  # [layers, gate|up, in, out]
    wd = jnp.asarray(rng.normal(0, 0.3, (3, 16, 8)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)

    def loss(act, dot, w, wd, x):
        def layer(x, ws):
            (wg, wu), wd = ws
            return x + dot(act(dot(x, wg), dot(x, wu)), wd), None

        return jnp.sum(jnp.sin(jax.lax.scan(layer, x, ((w[:, 0], w[:, 1]), wd))[0]))

    ours = lambda *a: loss(swiglu, lambda x, k: project(x, k, 1), *a)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(w, wd, x)
    want = jax.grad(lambda *a: loss(plain, jnp.matmul, *a), argnums=(0, 1, 2))(w, wd, x)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_bfloat16_keeps_dtypes():
    gate = jnp.linspace(-4, 4, 32, dtype=jnp.bfloat16)
    up = jnp.ones_like(gate)
    out, vjp = jax.vjp(swiglu, gate, up)
    dgate, dup = vjp(jnp.ones_like(out))
    assert out.dtype == dgate.dtype == dup.dtype == jnp.bfloat16
    x, kernel = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 2), jnp.bfloat16)
    y, project_vjp = jax.vjp(lambda x, k: project(x, k, 1), x, kernel)
    assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in project_vjp(jnp.ones_like(y)))
    want = jax.grad(lambda g: jnp.sum(plain(g.astype(jnp.float32), 1.0)))(gate.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dgate, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch", "full"])
def test_remat_policies_save_what_they_save_of_a_plain_dot(policy, capsys):
    """The "dots" policies keep a projection's output for the backward (its custom VJP hides the dot from them)."""
    x, kernel = jnp.ones((4, 8)), jnp.ones((8, 3))
    saved = {}
    for name, dot in (("project", lambda x, k: project(x, k, 1)), ("plain", jnp.matmul)):
        fn = jax.checkpoint(lambda x, k, dot=dot: jnp.sum(jnp.sin(dot(x, k))), policy=remat_policy(policy))
        capsys.readouterr()
        print_saved_residuals(fn, x, kernel)  # one line per residual, its type first
        saved[name] = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines())
    assert saved["project"] == saved["plain"]
    assert ("f32[4,3]" in saved["project"]) == (policy != "full")
