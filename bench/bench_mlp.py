"""The decoder's SwiGLU MLP, forward + backward over a scan of layers, five ways side by side in one run: plain
autodiff of `down(silu(gate(h)) * up(h))`; with `layers.swiglu` (a custom VJP on the elementwise product only);
with `layers.project` (the Dense layers' product, kernel gradient taken as `x^T dy`); with both (what the model
uses: the projections stay `Dense` modules, so LoRA still adds its terms); and the whole MLP as one custom VJP
(saves h, gate, up; both input-side weight gradients in one dot over `concat(dgate, dup)`), which would bypass
the `Dense` modules. float32 on CPU; wall and process CPU time (all threads), min over interleaved repeats.

    python bench/bench_mlp.py [--layers 8] [--tokens 774] [--hidden 768] [--mlp 2048] [--repeats 7]

Defaults are the 65m model of bench/bench_api.py. The ratio column is plain time / variant time (> 1: faster).
Figures recorded on 2026-12-03: docs/performance.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from molmo2_jax.model.layers import project, swiglu


def plain_mlp(h, wg, wu, wd):
    return (jax.nn.silu(h @ wg) * (h @ wu)) @ wd


def swiglu_mlp(h, wg, wu, wd):
    return swiglu(h @ wg, h @ wu) @ wd


def project_mlp(h, wg, wu, wd):
    return project(jax.nn.silu(project(h, wg, 1)) * project(h, wu, 1), wd, 1)


def model_mlp(h, wg, wu, wd):
    return project(swiglu(project(h, wg, 1), project(h, wu, 1)), wd, 1)


@jax.custom_vjp
def fused_mlp(h, wg, wu, wd):
    return plain_mlp(h, wg, wu, wd)


def _fused_fwd(h, wg, wu, wd):
    gate, up = h @ wg, h @ wu
    return (jax.nn.silu(gate) * up) @ wd, (h, gate, up, wg, wu, wd)


def _fused_bwd(res, dy):
    h, gate, up, wg, wu, wd = res
    sig = jax.nn.sigmoid(gate)
    act = gate * sig * up
    dact = dy @ wd.T
    dgate = dact * up * sig * (1 + gate * (1 - sig))
    dup = dact * gate * sig
    h2, d2 = h.reshape(-1, h.shape[-1]), jnp.concatenate([dgate, dup], -1).reshape(-1, 2 * gate.shape[-1])
    dw = h2.T @ d2  # both input-side weight gradients in one dot
    dh = dgate @ wg.T + dup @ wu.T
    dwd = act.reshape(-1, act.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    return dh, dw[:, :gate.shape[-1]], dw[:, gate.shape[-1]:], dwd


fused_mlp.defvjp(_fused_fwd, _fused_bwd)

VARIANTS = {"plain": plain_mlp, "swiglu": swiglu_mlp, "project": project_mlp, "both": model_mlp, "fused": fused_mlp}


def train_grad(mlp):
    """Gradient of a fixed linear loss of a residual scan of MLP layers, w.r.t. the stacked weights and x."""

    def loss(weights, x, probe):
        def layer(x, w):
            return x + mlp(x, *w), None

        return jnp.vdot(jax.lax.scan(layer, x, weights)[0], probe)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=774)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--mlp", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if min(args.layers, args.tokens, args.hidden, args.mlp, args.repeats) < 1:
        parser.error("--layers, --tokens, --hidden, --mlp and --repeats must be >= 1")

    rng = np.random.default_rng(0)
    n, d, f = args.layers, args.hidden, args.mlp
    weights = tuple(jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(s[1]))
                    for s in ((n, d, f), (n, d, f), (n, f, d)))
    x = jnp.asarray(rng.standard_normal((1, args.tokens, d), np.float32))
    probe = jnp.asarray(rng.standard_normal(x.shape, np.float32))
    fns = {name: train_grad(mlp) for name, mlp in VARIANTS.items()}
    grads = {name: jax.block_until_ready(fn(weights, x, probe)) for name, fn in fns.items()}
    for name in list(VARIANTS)[1:]:
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                  for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads["plain"])))
        print(f"{name}: gradients equal plain autodiff to {err:.1e} (max abs difference / max abs)")

    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(weights, x, probe))
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    print(f"{n} layers, x [1, {args.tokens}, {d}], MLP {f}, fwd+bwd, min of {args.repeats}:")
    for name in fns:
        w, c = min(wall[name]) * 1e3, min(cpu[name]) * 1e3
        print(f"  {name:7s} wall {w:8.1f} ms  cpu {c:8.1f} ms  ratio wall {min(wall['plain']) * 1e3 / w:.2f} "
              f"cpu {min(cpu['plain']) * 1e3 / c:.2f}")


if __name__ == "__main__":
    main()
