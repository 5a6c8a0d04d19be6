"""The ViT in chunks of crops and the connector in chunks of pooled tokens (`vit_chunk`) against one call over all
crops and tokens (float32, highest precision): logits, loss and the gradients of every parameter, for a Qwen3-style
and an Olmo3-style tiny model, on images, a video, an image row and a video row padded into one batch, and a packed
row; the chunk size is refused when not positive; on a mesh the chunks count crops and tokens per device, and no
device gathers the ViT features of crops it does not hold;
`generate --video --vit-chunk` end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from ref_model import collated, image_inputs, random_image, tokenizer_checkpoint, video_inputs
from test_loss_parity import ZERO_GRADIENTS, our_loss_and_grads, reference_labels

import molmo2_jax
from molmo2_jax import host_memory
from molmo2_jax.batch import shift_pooling
from molmo2_jax.cli import main
from molmo2_jax.config import ConfigError, Molmo2Config, load_preset
from molmo2_jax.model.connector import chunk_tokens
from molmo2_jax.training.config import OptimizerConfig, TrainConfig, load_train_config, model_config
from molmo2_jax.training.step import make_train_step

RTOL = 1e-5
CHUNK = 4  # crops per call: every case below has more, not a multiple (the ViT's last chunk is smaller, the
# connector's padded); so do its pooled tokens per connector call in every stream


def packed_row(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One-sequence image examples packed into one row (segment ids 1, 2, ..., positions restarting), their crops
    concatenated and pooling indices shifted into the concatenation."""
    tokens = ("input_ids", "attention_mask", "mm_token_type_ids")
    row = {k: np.concatenate([ex[k] for ex in examples], axis=1) for k in tokens}
    lengths = [ex["input_ids"].shape[1] for ex in examples]
    row["segment_ids"] = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    row["position_ids"] = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    row["pixel_values"] = np.concatenate([ex["pixel_values"] for ex in examples])
    offsets = np.cumsum([0] + [ex["pixel_values"].shape[0] * ex["pixel_values"].shape[1] for ex in examples])
    row["image_token_pooling"] = np.concatenate([shift_pooling(ex["image_token_pooling"], int(offset))
                                                 for ex, offset in zip(examples, offsets)])
    return row


CASES = {  # images and a video (one batch, a padded row; a chunk spans image crops and frames), a packed row
    "image_and_video_rows_padded": lambda: {
        k: v for k, v in collated([image_inputs([random_image(640, 480, 2)], seed=2, text_after=12),
                                   video_inputs(5, seed=3)]).items() if not k.endswith(("_grids", "_num_crops"))},
    "packed": lambda: packed_row([image_inputs([random_image(300, 200, 4)], seed=4, text_after=10),
                                  image_inputs([random_image(500, 300, 5)], seed=5, text_after=10)]),
}


@pytest.fixture(scope="module")
def models(reference):
    """(family, one-call model, chunked model) loaded from the same reference checkpoint."""
    family, _, path = reference
    return family, molmo2_jax.load(path, vit_chunk=None), molmo2_jax.load(path, vit_chunk=CHUNK, remat_policy="full")


def test_load_on_the_cpu_chunks_the_vit_within_a_thread_heap(models, reference):
    """Where freed host memory is reused (these tests run JAX on the CPU), `load` picks the most crops per ViT call
    whose fp32 MLP activation fits 3/4 of a thread's malloc heap; a given `vit_chunk`, None included, is kept."""
    if not host_memory.reusing():
        pytest.skip("freed host memory is not reused here (not glibc, or a GLIBC_TUNABLES malloc setting)")
    _, one_call, chunked = models
    assert one_call.config.vit_chunk is None and chunked.config.vit_chunk == CHUNK
    vision = one_call.config.vision
    per_crop = vision.num_patches * max(vision.intermediate_size, 3 * vision.hidden_size) * 4
    auto = molmo2_jax.load(reference[2]).config.vit_chunk
    assert auto * per_crop <= host_memory.THREAD_HEAP_BYTES * 3 // 4 < (auto + 1) * per_crop
    # the released ViT (so400m, MLP 4304) in fp32: 4 crops of 12.5 MB
    assert host_memory.crops_within_thread_heap(Molmo2Config().vision) == 4


def _relative(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_vit_and_connector_give_the_one_call_logits_and_gradients(models, case):
    family, whole, chunked = models
    inputs = CASES[case]()
    crops = sum(inputs[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if k in inputs)
    assert crops > CHUNK and crops % CHUNK  # several chunks, the last one smaller
    for key in ("image_token_pooling", "video_token_pooling"):  # the same for each stream's pooled tokens
        if key in inputs:
            rows, tokens, slots = chunked.prepare(inputs)[key].shape
            chunk = chunk_tokens(chunked.config, rows, slots)
            assert tokens > chunk and tokens % chunk, f"{case}: {key} {tokens} tokens, chunks of {chunk}"
    assert _relative(chunked(inputs), whole(inputs)) <= RTOL, f"{family}/{case}: logits"

    labels = reference_labels(inputs)
    step = lambda model: make_train_step(model.config, TrainConfig(optimizer=OptimizerConfig(z_loss_scale=0.0)))
    loss, grads = our_loss_and_grads(chunked, step(chunked), inputs, labels)
    want_loss, want = our_loss_and_grads(whole, step(whole), inputs, labels)
    assert loss == pytest.approx(want_loss, rel=RTOL)
    assert set(grads) == set(want)
    scale = max(float(np.max(np.abs(g))) for g in want.values())
    for path, g in want.items():  # gradients that are zero in exact arithmetic: against the largest gradient
        denominator = scale if path in ZERO_GRADIENTS else float(np.max(np.abs(g)))
        diff = float(np.max(np.abs(np.asarray(grads[path], np.float64) - np.asarray(g, np.float64))))
        assert diff <= RTOL * denominator, f"{family}/{case}: {path} differs by {diff / denominator:.2e}"


@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_chunk_size_that_is_not_positive_is_refused(value):
    with pytest.raises(ConfigError, match=r"^vit_chunk = .*positive") as error:
        Molmo2Config().replace(vit_chunk=value)
    assert "\n" not in str(error.value)


def test_chunk_size_from_a_preset_override_is_checked():
    assert load_preset("tiny", ["vit_chunk=8"]).vit_chunk == 8
    assert load_preset("tiny").vit_chunk is None  # one call unless asked
    with pytest.raises(ConfigError, match="vit_chunk"):
        load_preset("tiny", ["vit_chunk=0"])


@pytest.mark.parametrize("recipe", ["molmo2-4b-long-sft", "molmo2-8b-long-sft", "molmo2-o-7b-long-sft"])
def test_long_sft_recipes_set_the_chunk(recipe):
    config = model_config(load_train_config(recipe))
    assert config.vit_chunk and config.vit_chunk > 0


def test_generate_on_a_video_in_chunks_gives_the_same_answer(tmp_path, capsys):
    """`molmo2-jax generate --video` end to end, the ViT over 3 of 7 frames at a time and in one call."""
    checkpoint, video = tmp_path / "checkpoint", tmp_path / "clip.mp4"
    checkpoint.mkdir()
    tokenizer_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(7):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    answers = []
    for extra in ([], ["--vit-chunk", "3"]):
        code = main(["generate", "--checkpoint", str(checkpoint), "--video", str(video), "--prompt", "What is it?",
                     "--max-new-tokens", "6", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        answers.append(out)
    assert answers[0] == answers[1] and answers[0].strip()

    assert main(["generate", "--checkpoint", str(checkpoint), "--video", str(video), "--prompt", "?",
                 "--vit-chunk", "0"]) != 0
    err = capsys.readouterr().err
    assert err.strip() == "molmo2-jax generate: error: --vit-chunk must be >= 1 (crops per ViT call), got 0"


def _gathered_shapes(hlo: str) -> list[list[int]]:
    """The result shape of every all-gather in a compiled program's HLO text."""
    results = re.findall(r"= (.*?) all-gather(?:-start)?\(", hlo)  # `%name = f32[2,16]{1,0} all-gather(...`
    return [[int(d) for d in dims.split(",") if d] for r in results for dims in re.findall(r"\w\[([\d,]*)\]", r)]


def _mesh_worker() -> None:
    """On 8 simulated devices (fsdp=4, sequence=2), chunked and one call, as JSON: features of 11 crops; the pooled
    tokens of 4 rows of 3 crops and 11 tokens, and their connector gradients. Then on fsdp=8, the all-gathers of a
    chunked ViT and connector's gradient program over 8 rows of 4 crops."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")

    from molmo2_jax.model.molmo2 import Molmo2
    from molmo2_jax.params import flatten, init_params
    from molmo2_jax.sharding import activate, make_mesh

    config = load_preset("tiny", ["vision.image_size=56"])
    mesh = make_mesh({"fsdp": 4, "sequence": 2})
    params = init_params(config, 0, mesh)
    pixels = jax.random.normal(jax.random.key(1), (11, config.vision.num_patches, config.vision.patch_dim))
    out = {}
    for chunk in (None, 1):
        with activate(mesh):
            lowered = jax.jit(lambda p, x, c=config.replace(vit_chunk=chunk): Molmo2(c).apply(
                {"params": p}, x, method=Molmo2.vit_features)).lower(params, pixels)
        out[str(chunk)] = np.asarray(lowered.compile()(params, pixels)).tolist()
        v = config.vision  # 11 crops on 8 devices -> 2 crops per device, taken a crop per device at a time
        out[f"{chunk}_chunked"] = f"tensor<8x1x{v.num_patches}x{v.patch_dim}xf32>" in lowered.as_text()

    rows = jax.random.normal(jax.random.key(2), (4, 3, config.vision.num_patches, config.vision.patch_dim))
    pooling = jax.random.randint(jax.random.key(3), (4, 11, 4), -1, 3 * config.vision.num_patches)
    weights = jax.random.normal(jax.random.key(4), (4, 11, config.text.hidden_size))

    def pooled(c, p):
        tokens = Molmo2(c).apply({"params": p}, rows, pooling, method=Molmo2.visual_tokens)[0][0]
        return jnp.sum(tokens * weights), tokens

    for chunk in (None, 1):
        with activate(mesh):
            lowered = jax.jit(jax.value_and_grad(lambda p, c=config.replace(vit_chunk=chunk): pooled(c, p),
                                                 has_aux=True)).lower(params)
        (_, tokens), grads = lowered.compile()(params)
        out[f"tokens_{chunk}"] = np.asarray(tokens).tolist()
        out[f"grads_{chunk}"] = {k: np.asarray(g).tolist() for k, g in flatten(grads["connector"]).items()}
        # 16 patches of 4 slots: 4 tokens per crop, 1 row per device -> 11 tokens in 3 chunks of 4
        out[f"tokens_{chunk}_chunked"] = "tensor<3x4x4x4xi32>" in lowered.as_text()

    # 8 rows of 4 crops on fsdp=8 (a row per device), 2 crops per chunk: 2 chunks of 16 crops
    mesh = make_mesh({"fsdp": 8})
    config = config.replace(vit_chunk=2)
    params = init_params(config, 0, mesh)
    pixels = jax.ShapeDtypeStruct((8, 4, config.vision.num_patches, config.vision.patch_dim), jnp.float32)
    pooling = jax.ShapeDtypeStruct((8, 8, 4), jnp.int32)
    loss = lambda p, x, i: jnp.sum(Molmo2(config).apply({"params": p}, x, i, method=Molmo2.visual_tokens)[0][0])
    with activate(mesh):
        lowered = jax.jit(jax.grad(loss)).lower(params, pixels, pooling)
    out["batch_chunked"] = f"tensor<8x2x{v.num_patches}x{v.patch_dim}xf32>" in lowered.as_text()  # 2 of each row
    out["gathered"] = _gathered_shapes(lowered.compile().as_text())
    print(json.dumps(out))


@pytest.fixture(scope="module")
def mesh_run() -> dict:
    """`_mesh_worker`'s results (a subprocess on 8 simulated devices)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent.parent), str(Path(__file__).parent)]))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_on_a_mesh_a_chunk_counts_crops_and_tokens_per_device(mesh_run):
    """1 crop per device on 8 devices (crops split over fsdp and sequence): 11 crops run as 2 chunks of 8 (a
    slice `[8 devices, 1 crop]` of the device-major pixels each); the connector (rows split over fsdp) takes one
    crop's pooled tokens per device and row at a time."""
    out = mesh_run
    assert _relative(out["1"], out["None"]) <= RTOL
    assert out["1_chunked"] and not out["None_chunked"]
    assert _relative(out["tokens_1"], out["tokens_None"]) <= RTOL
    assert out["tokens_1_chunked"] and not out["tokens_None_chunked"]
    assert set(out["grads_1"]) == set(out["grads_None"])
    scale = max(float(np.max(np.abs(g))) for g in out["grads_None"].values())
    for path, g in out["grads_None"].items():  # zero in exact arithmetic: against the largest gradient
        denominator = scale if f"connector/{path}" in ZERO_GRADIENTS else float(np.max(np.abs(g)))
        diff = float(np.max(np.abs(np.asarray(out["grads_1"][path]) - np.asarray(g))))
        assert diff <= RTOL * denominator, f"connector/{path} differs by {diff / denominator:.2e}"


def test_chunks_of_a_batch_sharded_vit_stay_on_their_devices(mesh_run):
    """Each chunk takes 2 crops of every device's own row, so no device gathers other rows' ViT features (or their
    gradients). Chunks of the global crop axis (crops 0-15, then 16-31: each on 4 of the 8 devices) made XLA
    all-gather the stacked features of the whole batch onto every device."""
    config = load_preset("tiny", ["vision.image_size=56"])
    width = config.vision.hidden_size * len(config.adapter.vit_layers)  # F * D, the features' last axis
    one_device = 4 * config.vision.num_patches * width  # one row of 4 crops
    assert mesh_run["batch_chunked"]
    assert mesh_run["gathered"], "no all-gather at all: the program is not the one under test"
    too_big = [s for s in mesh_run["gathered"] if s[-1] == width and math.prod(s) > one_device]
    assert not too_big, f"all-gathers of more than one device's ViT features: {too_big}"


if __name__ == "__main__":
    _mesh_worker()
