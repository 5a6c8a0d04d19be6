"""`molmo2-jax plan`: compile the real-size training step on simulated CPU devices, or for a TPU topology through
libtpu (`--target v5p:4x4x4`), and print per-device memory, FLOPs and compile time next to an analytic estimate,
before renting the accelerators."""

from __future__ import annotations

import argparse
import math

# (ViT crops, pooled visual tokens) of one image per sequence: tiled 2x4 (the released default), or 1x1 where
# that does not fit in --seq
DEFAULT_IMAGES = ((9, 1162), (2, 392))

HELP = ("Compile the training step for a model, mesh and batch from abstract shapes on simulated CPU devices "
        "or for a TPU topology (--target, needs libtpu; nothing is allocated) and print per-device memory and FLOPs "
        "next to an analytic estimate.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset name (molmo2-4b, molmo2-8b, molmo2-o-7b, tiny) or "
                        "a preset YAML path")
    parser.add_argument("--mesh", required=True, help="mesh axes, e.g. fsdp=64,tensor=1 (data, fsdp, sequence, "
                        "tensor; unnamed axes are 1)")
    parser.add_argument("--devices", type=int, default=None,
                        help="simulated device count (default: the mesh size; needed when an axis is -1)")
    parser.add_argument("--target", default=None, metavar="TOPOLOGY",
                        help="compile for this TPU topology ahead of time instead of on simulated CPU devices, e.g. "
                        "v5p:4x4x4 (64 chips), v5e:2x2, v6e:4x4, v4:2x2x1; needs libtpu (pip install "
                        "'molmo2-jax[tpu]'); the mesh must cover its devices")
    parser.add_argument("--slices", type=int, default=1, metavar="N",
                        help="with --target: N such slices joined by the data-center network (multi-slice); the "
                        "slices split the mesh's data axis, then fsdp (default 1)")
    parser.add_argument("--batch", type=int, required=True, help="global batch (sequences per optimizer step)")
    parser.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--crops", type=int, help="ViT crops or video frames per sequence (default 9, a 2x4-tiled "
                        "image; 2, a 1x1-tiled one, where --seq is below 1162)")
    parser.add_argument("--tokens", type=int, help="pooled visual tokens per sequence (default 1162, a 2x4-tiled "
                        "image; 392, a 1x1-tiled one, where --seq is below 1162)")
    parser.add_argument("--pool", type=int, default=4, help="patches per pooled token: 4 images, 9 video")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                        help="compute dtype (params and optimizer state stay float32)")
    parser.add_argument("--remat", default="full", help="remat policy: none, full, dots, dots_no_batch")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="plan LoRA training of this rank instead of full fine-tuning (default 0: full)")
    parser.add_argument("--lora-targets", default=None, metavar="REGEX",
                        help="kernels to adapt (default: the LLM's q/k/v/o and MLP)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=0, metavar="N",
                        help="plan the chunked loss, N tokens per device per chunk (the train config's "
                             "loss_chunk_tokens; default 0: the plain loss over the whole fp32 logits)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="model config overrides, e.g. text.num_layers=2")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.sharding import MeshError, mesh_shape, parse_mesh

    spec = parse_mesh(args.mesh)
    devices = args.devices
    if args.target is None and args.slices != 1:
        raise MeshError("--slices is for --target (slices of a TPU topology)")
    if args.target is not None:
        if devices is not None:
            raise MeshError("--devices is for simulated CPU devices; with --target the topology sets the count")
        devices = 1  # the step compiles for the topology's devices; JAX itself starts on one CPU device
    elif devices is None:
        if -1 in spec.values():
            raise MeshError(f"--mesh {args.mesh!r} has a -1 axis; pass --devices to say how many devices to fill")
        devices = math.prod(spec.values())
    if args.target is None:
        mesh_shape(spec, devices)  # a mesh that does not match the device count fails here, before JAX starts

    import jax

    if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001 - the device count is fixed at start-up
        if jax.device_count() != devices:
            raise MeshError(f"JAX already started with {jax.device_count()} devices; run plan in a fresh process")
    else:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", devices)

    from molmo2_jax.config import load_preset
    from molmo2_jax.plan import Workload, format_report, plan, target_mesh, tpu_target
    from molmo2_jax.sharding import make_mesh
    from molmo2_jax.training.config import parse_train_config

    config = load_preset(args.model, [f"dtype={args.dtype}", f"remat_policy={args.remat}", *args.overrides])
    crops, tokens = next((image for image in DEFAULT_IMAGES if image[1] <= args.seq), DEFAULT_IMAGES[-1])
    work = Workload(batch=args.batch, seq=args.seq, crops=crops if args.crops is None else args.crops,
                    tokens=tokens if args.tokens is None else args.tokens, pool=args.pool)
    lora = {"rank": args.lora} | ({"targets": args.lora_targets} if args.lora_targets else {})
    train = parse_train_config({"model": {"preset": args.model}, "lora": lora,
                                "loss_chunk_tokens": args.loss_chunk_tokens})
    target = None if args.target is None else tpu_target(args.target, args.slices)
    mesh = make_mesh(spec) if target is None else target_mesh(target, spec)
    result = plan(config, mesh, work, train, target)
    print(format_report(args.model, config, mesh, work, result, train), flush=True)
    return 0
