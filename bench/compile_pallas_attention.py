"""Compiles the Pallas attention kernel with Mosaic for one device of a TPU topology, ahead of time from this
(CPU) host through libtpu: `jax.value_and_grad` of a loss through `pallas_attention`, so the forward kernel and both
backward kernels (dQ; dK/dV). Prints per (target, tiles) the compile time and XLA's temporary bytes; a kernel
that does not fit VMEM fails to compile. No TPU is needed, only libtpu (`pip install 'molmo2-jax[tpu]'`).

    PYTHONPATH=. python bench/compile_pallas_attention.py --targets v5e:2x2,v5p:2x2x1 --tiles 512,1024
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from molmo2_jax.model.layers import MaskInfo
from molmo2_jax.model.pallas_attention import pallas_attention
from molmo2_jax.plan import tpu_target

MOSAIC_CALL = r'%(molmo2_attention\w*?)(?:\.\d+)? = .*custom_call_target="tpu_custom_call"'  # a kernel in the HLO


def compile_grad(target: str, tokens: int, heads: int, kv_heads: int, head_dim: int, tile: int):
    """The compiled value and gradient of `sum(attention)` over q, k, v (bfloat16, batch 1) on the first device of
    `target`: shardings on a TPU device make the lowering (and `platform_dependent`) take the TPU branch."""
    mesh = Mesh(np.array(tpu_target(target).devices[:1]), ("x",))
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    q = spec((1, tokens, heads, head_dim), jnp.bfloat16)
    k = spec((1, tokens, kv_heads, head_dim), jnp.bfloat16)
    vec = spec((1, tokens), jnp.int32)
    flag = spec((1, tokens), jnp.bool_)
    mask = MaskInfo(vec, vec, flag, vec, vec, flag)

    def loss(q, k, v, mask):
        return pallas_attention(q, k, v, mask, block_q=tile, block_kv=tile).astype(jnp.float32).sum()

    with jax.set_mesh(mesh):  # as `plan` compiles: Mosaic's lowering reads the TPU generation off the mesh
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, k, k, mask).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="v5e:2x2,v5p:2x2x1")
    parser.add_argument("--tiles", default="512,1024")
    parser.add_argument("--tokens", type=int, default=36864)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    print(f"value_and_grad of pallas_attention, bfloat16, {args.tokens} tokens, {args.heads} heads, "
          f"{args.kv_heads} KV heads, head_dim {args.head_dim}, one device")
    for target in args.targets.split(","):
        for tile in map(int, args.tiles.split(",")):
            start = time.perf_counter()
            compiled = compile_grad(target, args.tokens, args.heads, args.kv_heads, args.head_dim, tile)
            seconds = time.perf_counter() - start
            kernels = sorted(set(re.findall(MOSAIC_CALL, compiled.as_text())))
            temp = compiled.memory_analysis().temp_size_in_bytes
            print(f"{target} {tile}x{tile}: compiled in {seconds:.1f} s, temp {temp / 2**20:.1f} MiB, "
                  f"Mosaic kernels {' '.join(kernels)}")


if __name__ == "__main__":
    main()
