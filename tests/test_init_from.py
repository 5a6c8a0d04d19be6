"""Starting points: a Molmo2 built from a Hugging Face Qwen3 / Olmo3 LLM and a SigLIP / SigLIP2 vision tower
gives the logits / features of the reference `Qwen3ForCausalLM`, `Olmo3ForCausalLM`, `SiglipVisionModel` and
`Siglip2VisionModel` (tiny random configs, float32, highest precision); bad sources fail with one message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    Olmo3Config,
    Olmo3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from molmo2_jax.checkpoint.hf import CheckpointError
from molmo2_jax.checkpoint.init_from import params_from_llm_vit, starting_config
from molmo2_jax.config import load_preset
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.params import flatten, init_params, param_shapes, unflatten

ATOL = 1e-4
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=8, vocab_size=320, rms_norm_eps=1e-6)


def _randomise_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():  # so a mix-up of norms cannot hide behind all-ones weights
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))


def make_llm(path, family: str):
    torch.manual_seed(1)
    if family == "qwen3":  # tied embeddings: no lm_head.weight in the file
        model = Qwen3ForCausalLM(Qwen3Config(**TEXT, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    else:
        model = Olmo3ForCausalLM(Olmo3Config(**{**TEXT, "num_key_value_heads": 8}, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    _randomise_norms(model)
    model.eval().save_pretrained(path)
    return model


def make_vit(path, kind: str):
    torch.manual_seed(2)  # one more block than the model uses, to check that it is skipped
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=14)
    if kind == "siglip":  # Conv2d patch embedding, 27x27 position table
        model = SiglipVisionModel(SiglipVisionConfig(**size, image_size=378))
    else:  # NaFlex: Linear patch embedding, a 16x16 position table resized to the 27x27 grid
        model = Siglip2VisionModel(Siglip2VisionConfig(**size, num_patches=256))
    _randomise_norms(model)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def vit(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, make_vit(path, request.param), path


@pytest.fixture(scope="module", params=["qwen3", "olmo3"])
def llm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, make_llm(path, request.param), path


@pytest.fixture(scope="module")
def started(llm, vit):
    family, reference, llm_path = llm
    config = starting_config(load_preset("tiny"), llm_path, vit[2])
    random = {p: np.asarray(x) for p, x in flatten(init_params(config, 0)).items()}
    params = params_from_llm_vit(config, llm_path, vit[2], random, param_shapes(config))
    return family, reference, config, unflatten(params), random


def test_llm_logits_match_reference(started):
    family, llm, config, params, _ = started
    ids = np.random.default_rng(0).integers(0, 320, (2, 13))
    with torch.no_grad():
        expected = llm(torch.from_numpy(ids)).logits.numpy()
    logits, _ = jax.jit(lambda p, x: Molmo2(config).apply({"params": p}, x))(params, jnp.asarray(ids))
    diff = float(np.max(np.abs(np.asarray(logits) - expected)))
    assert diff <= ATOL, f"{family}: max |diff| {diff}"


def test_vit_features_match_reference(started, vit):
    _, _, config, params, _ = started
    kind, reference, _ = vit
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 378, 378)).astype(np.float32)
    # our patch vectors: row-major 27x27 grid, each patch flattened as (row, column, channel)
    patches = images.reshape(2, 3, 27, 14, 27, 14).transpose(0, 2, 4, 3, 5, 1).reshape(2, 729, 588)
    with torch.no_grad():
        if kind == "siglip":
            out = reference(torch.from_numpy(images), output_hidden_states=True)
        else:
            out = reference(torch.from_numpy(patches), pixel_attention_mask=torch.ones(2, 729, dtype=torch.long),
                            spatial_shapes=torch.tensor([[27, 27], [27, 27]]), output_hidden_states=True)
    expected = np.concatenate([out.hidden_states[layer + 1].numpy() for layer in config.adapter.vit_layers], -1)
    got = jax.jit(lambda p, x: Molmo2(config).apply({"params": p}, x, method="vit_features"))(params, patches)
    assert float(np.max(np.abs(np.asarray(got) - expected))) <= ATOL


def test_unsourced_params_keep_their_random_init(started):
    _, _, config, params, random = started
    flat = flatten(params)
    assert np.array_equal(flat["connector/q/kernel"], random["connector/q/kernel"])
    extra = slice(config.text.vocab_size, None)
    assert np.array_equal(flat["embedding"][extra], random["embedding"][extra])
    assert not np.array_equal(flat["embedding"][:10], random["embedding"][:10])


def test_bad_sources_fail_with_one_message(vit, tmp_path):
    base = load_preset("tiny")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: not a Hugging Face checkpoint \(no config.json\)"):
        starting_config(base, tmp_path, vit[2])
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"LLM model_type 'llama' is not supported"):
        starting_config(base, tmp_path, vit[2])
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, '
                                          '"num_hidden_layers": 2, "num_attention_heads": 8, "vocab_size": 1000}')
    with pytest.raises(CheckpointError, match=r"vocab_size 1000 does not fit the preset's image/video token ids"):
        starting_config(base, tmp_path, vit[2])


def test_checkpoint_of_another_shape_fails_with_the_tensors_named(llm, vit, tmp_path):
    _, _, llm_path = llm
    config = starting_config(load_preset("tiny"), llm_path, vit[2])
    wider = config.replace(text=config.text.__class__(**{**config.text.__dict__, "intermediate_size": 96}))
    random = {p: np.asarray(x) for p, x in flatten(init_params(wider, 0)).items()}
    with pytest.raises(CheckpointError, match=rf"{llm_path}: checkpoint does not match the model config; wrong "
                                              r"shape: model.layers.0.mlp.gate_proj.weight \[128, 64\].*\(\+2 more\)"):
        params_from_llm_vit(wider, llm_path, vit[2], random, param_shapes(wider))


def test_sft_starts_from_a_molmo2_checkpoint_or_a_training_step(tmp_path):
    """init.kind molmo2: the released-layout HF checkpoint's params (as `molmo2_jax.load` reads them), or the
    params of a training run or of its step directory, become the train state's params."""
    from ref_model import make_reference

    import molmo2_jax
    from molmo2_jax.training.checkpointing import Checkpointer
    from molmo2_jax.training.config import parse_train_config
    from molmo2_jax.training.run import resolve_model_config, starting_state
    from molmo2_jax.training.step import make_train_step

    make_reference(tmp_path / "hf", "qwen3")
    train = parse_train_config({"run_dir": str(tmp_path / "run"),
                                "init": {"kind": "molmo2", "checkpoint": str(tmp_path / "hf")}})
    config = resolve_model_config(train)
    ts = make_train_step(config, train)
    state = starting_state(ts)
    expected = flatten(molmo2_jax.load(tmp_path / "hf").params)
    assert all(np.array_equal(np.asarray(x), expected[p]) for p, x in flatten(state["params"]).items())

    checkpointer = Checkpointer(tmp_path / "run", train.checkpoint)
    checkpointer.save(3, state, config, train)
    checkpointer.wait()
    for start in (tmp_path / "run" / "3", tmp_path / "run"):  # a step directory, or a run (its latest step)
        sft = parse_train_config({"run_dir": str(tmp_path / "sft"),
                                  "init": {"kind": "molmo2", "checkpoint": str(start)}})
        assert resolve_model_config(sft) == config
        restored = starting_state(make_train_step(config, sft))
        assert all(np.array_equal(np.asarray(x), expected[p]) for p, x in flatten(restored["params"]).items())
        assert int(restored["step"]) == 0  # a new run: fresh optimizer state and step
