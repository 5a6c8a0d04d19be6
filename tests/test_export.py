"""Export to the Hugging Face layout (`molmo2-jax export`): a bit-identical HF -> ours -> HF round trip, a
model trained a few steps in JAX that transformers loads with the same logits, shards and index, output dtype,
and one-line errors with nothing written for bad sources and destinations."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from ref_model import image_inputs, random_image, reference_logits, text_ids
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import Molmo2ForConditionalGeneration

import molmo2_jax
from molmo2_jax.checkpoint import converted
from molmo2_jax.checkpoint.convert import convert_hf_to_jax
from molmo2_jax.checkpoint.export import INDEX_FILE, export_to_hf
from molmo2_jax.cli import main
from molmo2_jax.config import to_dict
from molmo2_jax.params import flatten, unflatten

EMBEDDING, NEW_EMBEDDING = "model.transformer.wte.embedding", "model.transformer.wte.new_embedding"


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def released(reference, tmp_path_factory):
    """The reference checkpoint with its embedding split as in the released files ([vocab] + [additional] rows;
    `save_pretrained` splits it into equal halves instead)."""
    family, ref, path = reference
    out = tmp_path_factory.mktemp(f"released_{family}")
    tensors = read_tensors(path)
    table = np.concatenate([tensors[EMBEDDING], tensors[NEW_EMBEDDING]])
    vocab = ref.config.text_config.vocab_size
    tensors[EMBEDDING], tensors[NEW_EMBEDDING] = table[:vocab].copy(), table[vocab:].copy()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(path / name, out / name)
    return family, ref, out


def test_round_trip_is_bit_identical(released, tmp_path):
    family, _, src = released
    convert_hf_to_jax(src, tmp_path / "jax", log=None)
    shards = export_to_hf(tmp_path / "jax", tmp_path / "hf", max_shard_bytes=300_000, log=None)
    before, after = read_tensors(src), read_tensors(tmp_path / "hf")
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].shape == value.shape, name
        assert after[name].tobytes() == value.tobytes(), name
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in before.values())
    for shard in shards:
        with safe_open(str(tmp_path / "hf" / shard), framework="numpy") as f:
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) <= 300_000 or len(list(f.keys())) == 1
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    export_to_hf(src, tmp_path / "direct", log=None)  # a Hugging Face source, exported without converting first
    direct = read_tensors(tmp_path / "direct")
    assert sorted(direct) == sorted(after) and all(direct[n].tobytes() == v.tobytes() for n, v in after.items())


def test_round_trip_of_save_pretrained_output(reference, tmp_path):
    """`save_pretrained` splits the embedding table into equal halves; the export writes the released split, and
    every tensor (the embedding as the concatenated table) comes back bit-identical."""
    family, ref, src = reference
    convert_hf_to_jax(src, tmp_path / "jax", log=None)
    export_to_hf(tmp_path / "jax", tmp_path / "hf", log=None)
    before, after = read_tensors(src), read_tensors(tmp_path / "hf")
    assert sorted(after) == sorted(before)
    for name in before:
        if name not in (EMBEDDING, NEW_EMBEDDING):
            assert after[name].tobytes() == before[name].tobytes(), name
    table = lambda t: np.concatenate([t[EMBEDDING], t[NEW_EMBEDDING]])
    assert table(after).tobytes() == table(before).tobytes()
    assert after[NEW_EMBEDDING].shape[0] == ref.config.text_config.additional_vocab_size


def _train(model: molmo2_jax.Molmo2Model, inputs: dict, steps: int = 3):
    """A few SGD steps on next-token cross-entropy; returns (params, optax Adam state as a stand-in)."""
    prepared = model.prepare(inputs)
    ids = prepared["input_ids"]

    def loss_fn(params):
        logits, _ = model.module.apply({"params": params}, **prepared)
        log_p = jax.nn.log_softmax(logits[:, :-1], -1)
        targets = ids[:, 1:]
        text = targets < logits.shape[-1]  # image tokens are never predicted (lm_head has base vocabulary rows)
        picked = jnp.take_along_axis(log_p, jnp.where(text, targets, 0)[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(text, picked, 0.0)) / jnp.sum(text)

    tx = optax.sgd(0.5)
    params, opt_state = model.params, tx.init(model.params)
    grad = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for _ in range(steps):
        loss, grads = grad(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    return params, optax.adam(1e-3).init(params)


def _save_training_checkpoint(run_dir: Path, step: int, params, opt_state, config) -> None:
    """The training run layout: per step an Orbax `state` item ({step, params, opt_state}) and a `config`
    JSON item holding the model config."""
    with ocp.CheckpointManager(run_dir.absolute()) as manager:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": jnp.int32(step), "params": params, "opt_state": opt_state}),
            config=ocp.args.JsonSave({"model": to_dict(config), "train": {"lr": 0.5}})))
        manager.wait_until_finished()


CASES = {
    "text": lambda: {"input_ids": np.asarray([text_ids(np.random.default_rng(5), 19)])},
    "image": lambda: image_inputs([random_image(500, 380, 3)], seed=4),
}


@pytest.mark.slow
def test_trained_model_exports_and_loads_in_transformers(reference, tmp_path):
    family, ref, src = reference
    model = molmo2_jax.load(src)
    params, opt_state = _train(model, image_inputs([random_image(400, 300, 7)], seed=2))
    trained = molmo2_jax.Molmo2Model(model.config, params)
    _save_training_checkpoint(tmp_path / "run", 3, params, opt_state, model.config)
    shutil.copy(src / "generation_config.json", tmp_path / "run" / "generation_config.json")
    export_to_hf(tmp_path / "run", tmp_path / "hf", log=None)
    exported = Molmo2ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    for case, make in CASES.items():
        inputs = make()
        ours = np.asarray(trained(inputs))
        theirs = reference_logits(exported, inputs)
        assert np.max(np.abs(ours - theirs)) <= 1e-4, f"{family}/{case}: {np.max(np.abs(ours - theirs))}"
        before = reference_logits(ref, inputs)
        assert np.max(np.abs(theirs - before)) > 1e-3, "training did not change the exported model"
    assert (tmp_path / "hf" / "generation_config.json").is_file()


def test_bfloat16_output(released, tmp_path):
    family, _, src = released
    if family != "qwen3":
        pytest.skip("the dtype cast does not depend on the family")
    convert_hf_to_jax(src, tmp_path / "jax", log=None)
    export_to_hf(tmp_path / "jax", tmp_path / "hf", dtype="bfloat16", log=None)
    before, after = read_tensors(src), read_tensors(tmp_path / "hf")
    for name, value in before.items():
        assert after[name].dtype == ml_dtypes.bfloat16
        assert after[name].tobytes() == value.astype(ml_dtypes.bfloat16).tobytes(), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    model = Molmo2ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_inputs_one_line_errors_nothing_written(reference, tmp_path, capsys):
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("input validation does not depend on the family")
    convert_hf_to_jax(src, tmp_path / "jax", log=None)

    def run(*argv: str) -> str:
        assert main(["export", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("molmo2-jax export: error: ")
        return err[-1]

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert "destination exists and is not empty (pass --overwrite" in run(str(tmp_path / "jax"), str(dst))
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]

    (tmp_path / "empty").mkdir()
    message = run(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert f"{tmp_path / 'empty'}: not a Molmo2 checkpoint; expected a Hugging Face directory" in message
    assert "--step 3 needs a training run directory" in run(str(tmp_path / "jax"), str(tmp_path / "out"), "--step", "3")
    assert "checkpoint directory does not exist" in run(str(tmp_path / "nowhere"), str(tmp_path / "out"))

    # Params that do not match the saved config (another model's params under this config).
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "jax", other)
    saved = json.loads((other / converted.CONFIG_FILE).read_text())
    saved["text"]["intermediate_size"] += 8
    saved["text"]["num_layers"] += 1
    (other / converted.CONFIG_FILE).write_text(json.dumps(saved))
    message = run(str(other), str(tmp_path / "out"))
    assert "params do not match the model config" in message and "decoder/layers/" in message

    model = molmo2_jax.load(tmp_path / "jax")
    _save_training_checkpoint(tmp_path / "run", 2, model.params, {}, model.config)
    assert "training run has no step 7 (saved steps: [2])" in run(str(tmp_path / "run"), str(tmp_path / "out"),
                                                                  "--step", "7")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    assert main(["export", str(tmp_path / "jax"), str(dst), "--overwrite"]) == 0
    assert (dst / INDEX_FILE).is_file() and not (dst / "keep.txt").exists()


def test_training_checkpoint_params_only(reference, tmp_path):
    """Exporting a training step directory reads params only; the result equals exporting the same params saved
    as a converted checkpoint."""
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("source handling does not depend on the family")
    model = molmo2_jax.load(src)
    params = unflatten({p: v * 1.5 for p, v in flatten(model.params).items()})
    opt_state = optax.adam(1e-3).init(params)
    _save_training_checkpoint(tmp_path / "run", 5, params, opt_state, model.config)
    export_to_hf(tmp_path / "run" / "5", tmp_path / "from_step", log=None)
    converted.write_atomically(tmp_path / "conv", False, lambda tmp: converted.save(tmp, model.config, params))
    export_to_hf(tmp_path / "conv", tmp_path / "from_converted", log=None)
    a, b = read_tensors(tmp_path / "from_step"), read_tensors(tmp_path / "from_converted")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
