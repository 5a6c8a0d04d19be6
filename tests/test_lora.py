"""LoRA: adapters trained here load in transformers + peft with the same logits (and merged, in transformers
alone), a PEFT adapter made in PyTorch gives PyTorch's logits here, the base stays bit-identical and out of the
optimizer state, kill-and-resume is exact, and bad targets / ranks / adapter directories fail in one line."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from ref_model import MM_IDS, VOCAB, image_inputs, random_image, reference_logits, text_ids
from test_cli_generate import checkpoint, media  # noqa: F401 (fixtures)
from transformers import Molmo2ForConditionalGeneration

import molmo2_jax
from molmo2_jax import cli, lora
from molmo2_jax.checkpoint.hf import CheckpointError
from molmo2_jax.params import flatten
from molmo2_jax.training.checkpointing import Checkpointer
from molmo2_jax.training.config import TrainConfigError
from molmo2_jax.training.loop import Trainer, initial_state, stack_micro_batches
from molmo2_jax.training.step import make_train_step

SEQ = 20


def text_batches(seed: int):
    """Endless host batches of 2 random text rows (the training batch contract, one micro-batch each)."""
    rng = np.random.default_rng(seed)
    while True:
        ids = rng.integers(1, VOCAB, (2, SEQ)).astype(np.int32)
        yield {"input_ids": ids, "target_ids": np.roll(ids, -1, axis=1),
               "loss_weights": (np.arange(SEQ) < SEQ - 1).astype(np.float32)[None].repeat(2, 0),
               "segment_ids": np.ones_like(ids), "position_ids": np.arange(SEQ, dtype=np.int32)[None].repeat(2, 0),
               "mm_token_type_ids": np.isin(ids, MM_IDS).astype(np.int32)}


def lora_train_config(run_dir, **lora_changes):
    from test_training import train_config

    changes = {"lora.rank": 4, "lora.alpha": 8.0, "lora.lr": 3e-2, "lora.warmup_steps": 0, **{
        k if k == "grad_accum" else f"lora.{k}": v for k, v in lora_changes.items()}}
    return train_config(run_dir, **changes)


CASES = {"text": lambda: {"input_ids": np.asarray([text_ids(np.random.default_rng(5), 19)])},
         "image": lambda: image_inputs([random_image(500, 380, 3)], seed=4)}


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.slow
def test_trained_adapter_loads_in_peft_and_merged_in_transformers(reference, tmp_path):
    family, _, src = reference
    base = molmo2_jax.load(src)
    config = lora_train_config(tmp_path / "run", dropout=0.1, rslora=family == "olmo3")
    config = dataclasses.replace(config, init=dataclasses.replace(config.init, checkpoint=str(src)))
    ts = make_train_step(base.config, config)
    ts.set_base(base.params)
    state, data = ts.init_state(0), text_batches(0)
    opt_leaves = jax.tree_util.tree_leaves(state["opt_state"])
    adapter_shapes = {x.shape for x in jax.tree_util.tree_leaves(state["params"])}
    assert all(x.shape in adapter_shapes or x.ndim == 0 for x in opt_leaves)  # only adapter-shaped arrays
    assert sum(x.size for x in opt_leaves) < 3 * sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    for _ in range(3):
        state, _ = ts.step(state, stack_micro_batches([next(data)]))
    for path, value in flatten(base.params).items():  # the frozen base is bit-identical after training
        assert np.asarray(flatten(ts.base)[path]).tobytes() == np.asarray(value).tobytes(), path

    checkpointer = Checkpointer(tmp_path / "run", ts.train_config.checkpoint)
    checkpointer.save(3, state, base.config, ts.train_config)
    checkpointer.wait()
    adapter_dir = tmp_path / "adapter"
    assert cli.main(["export", str(tmp_path / "run"), str(adapter_dir), "--adapter-only"]) == 0
    theirs = PeftModel.from_pretrained(Molmo2ForConditionalGeneration.from_pretrained(src, dtype=torch.float32),
                                       adapter_dir).eval()
    ours = molmo2_jax.Molmo2Model(base.config, lora.combine(base.params, state["params"]), lora=ts.lora)
    loaded = molmo2_jax.load(src, adapter=adapter_dir)
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0  # into its init.checkpoint
    assert cli.main(["export", str(src), str(tmp_path / "merged2"), "--adapter", str(adapter_dir)]) == 0
    for file in (tmp_path / "merged").glob("*.safetensors"):  # the same model both ways
        assert file.read_bytes() == (tmp_path / "merged2" / file.name).read_bytes(), file.name
    merged = Molmo2ForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    for case, make in CASES.items():
        inputs = make()
        expected = reference_logits(theirs, inputs)
        assert max_diff(ours(inputs), expected) <= 1e-4, f"{family}/{case}"
        assert max_diff(loaded(inputs), expected) <= 1e-4, f"{family}/{case}: load(adapter=)"
        assert max_diff(reference_logits(merged, inputs), expected) <= 1e-4, f"{family}/{case}: merged"
        assert max_diff(expected, base(inputs)) > 1e-3, "training did not change the model"


def test_peft_adapter_made_in_pytorch_gives_pytorchs_logits(reference, tmp_path):
    """LLM, ViT and connector layers, random non-zero B, rsLoRA scaling."""
    _, _, src = reference
    torch.manual_seed(1)
    model = Molmo2ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    peft_config = PeftLoraConfig(r=3, lora_alpha=5.0, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"])
    theirs = get_peft_model(model, peft_config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "adapter")
    unmerged = molmo2_jax.load(src, adapter=tmp_path / "adapter")
    merged = molmo2_jax.load(src, adapter=tmp_path / "adapter", merge_adapter=True)
    assert any(p.startswith("vision/") for p in flatten(unmerged.params) if p.endswith("lora_b"))
    assert any(p.startswith("connector/") for p in flatten(unmerged.params) if p.endswith("lora_b"))
    inputs = CASES["image"]()
    expected = reference_logits(theirs, inputs)
    assert max_diff(unmerged(inputs), expected) <= 1e-4
    assert max_diff(merged(inputs), expected) <= 1e-4
    with theirs.disable_adapter():
        assert max_diff(reference_logits(theirs, inputs), expected) > 1e-3


def test_zero_b_is_the_base_model(reference):
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("does not depend on the family")
    base = molmo2_jax.load(src)
    config = lora.LoraConfig(rank=4, targets=r"decoder/.*/kernel|vision/.*/kernel|connector/.*/kernel")
    adapted = molmo2_jax.Molmo2Model(base.config, lora.combine(base.params, lora.init_adapters(base.config, config)),
                                     lora=config)
    inputs = CASES["image"]()
    np.testing.assert_array_equal(adapted(inputs), base(inputs))


def test_kill_and_resume_gives_identical_losses(tmp_path):
    from batches import synthetic_batches
    from test_training import MODEL, Kill, killed_after

    ts = make_train_step(MODEL, lora_train_config(tmp_path, dropout=0.1))
    ts.set_base(0)
    full = Trainer(ts, Checkpointer(tmp_path / "full", ts.train_config.checkpoint), log=lambda _: None)
    data = synthetic_batches(2)
    full.run(ts.init_state(0), data, data)
    expected = dict(full.history)
    ckpt = Checkpointer(tmp_path / "killed", ts.train_config.checkpoint)
    data = synthetic_batches(2)
    with pytest.raises(Kill):
        Trainer(ts, ckpt, log=lambda _: None).run(ts.init_state(0), killed_after(data, 3), data)
    ckpt.wait()
    ckpt = Checkpointer(tmp_path / "killed", ts.train_config.checkpoint)
    data = synthetic_batches(2)
    state = initial_state(ts, ckpt, lambda: pytest.fail("should resume"), data, log=lambda _: None)
    assert int(state["step"]) == 2
    resumed = Trainer(ts, ckpt, log=lambda _: None)
    resumed.run(state, data, data)
    assert [s for s, _ in resumed.history] == [3, 4]
    for step, metrics in resumed.history:
        assert metrics["loss"] == expected[step]["loss"], f"step {step}"


def test_resuming_with_other_lora_settings_fails_in_one_line(tmp_path):
    """Another rank, or no LoRA at all, is refused before any array is read; the checkpoint stays in place."""
    from test_training import MODEL, synthetic_batches

    from molmo2_jax.training.checkpointing import ResumeError

    ts = make_train_step(MODEL, lora_train_config(tmp_path))
    ts.set_base(0)
    ckpt = Checkpointer(tmp_path / "run", ts.train_config.checkpoint)
    Trainer(ts, ckpt, log=lambda _: None).run(ts.init_state(0), synthetic_batches(2), None)
    ckpt.close()
    others = {"rank 8": make_train_step(MODEL, lora_train_config(tmp_path, rank=8)),
              "no lora": make_train_step(MODEL, lora_train_config(tmp_path, rank=0))}
    for name, other in others.items():
        ckpt = Checkpointer(tmp_path / "run", other.train_config.checkpoint)
        with pytest.raises(ResumeError) as e:
            initial_state(other, ckpt, lambda: pytest.fail("should not start fresh"), log=lambda _: None)
        ckpt.close()
        message = str(e.value)
        assert "checkpoint trained LoRA adapters (rank 4" in message and "\n" not in message, name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["2", "4"]


def test_bad_targets_and_ranks_fail_in_one_line(tmp_path):
    from test_training import MODEL

    cases = {"targets": ({"targets": "decoder/layers/qq/kernel"}, "matches no linear layer"),
             "rank": ({"rank": 100}, "lora.rank 100 exceeds the in/out sizes"),
             "non-linear": ({"targets": "decoder/layers/(q|q_norm)/.*"}, "not linear-layer kernels")}
    for name, (changes, message) in cases.items():
        with pytest.raises(TrainConfigError) as e:
            make_train_step(MODEL, lora_train_config(tmp_path, **changes))
        assert message in str(e.value) and "\n" not in str(e.value), name


def test_adapter_for_another_base_names_the_shapes(reference, tmp_path):
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("does not depend on the family")
    from ref_model import tiny_config

    other = Molmo2ForConditionalGeneration(tiny_config("qwen3", intermediate_size=80))
    get_peft_model(other, PeftLoraConfig(r=2, target_modules=["gate_proj", "q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as e:
        molmo2_jax.load(src, adapter=tmp_path)
    message = str(e.value)
    assert "model.language_model.layers.0.mlp.gate_proj: lora_A [2, 64] / lora_B [80, 2]" in message
    assert "[96, 2]" in message and "\n" not in message


def test_generate_with_adapter_matches_peft(checkpoint, media, capsys, tmp_path):  # noqa: F811 (fixtures)
    """`molmo2-jax generate --adapter DIR` answers as transformers + peft do (greedy), not as the base does."""
    from PIL import Image
    from test_cli_generate import NEW_TOKENS, reference_answer, run_cli

    path, _ = checkpoint
    torch.manual_seed(2)
    peft_model = get_peft_model(Molmo2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32),
                                PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    prompt, image = "Point to the dogs.", media / "a.png"
    answer = lambda model: reference_answer(path, model, prompt, [Image.open(image).convert("RGB")])
    expected = answer(peft_model)
    with peft_model.disable_adapter():
        assert answer(peft_model) != expected
    for merge in ([], ["--merge-adapter"]):
        code, out, err = run_cli(capsys, "--checkpoint", path, "--image", image, "--prompt", prompt,
                                 "--max-new-tokens", NEW_TOKENS, "--adapter", tmp_path / "adapter", *merge)
        assert code == 0, err
        assert out[:-1] == expected and expected


def test_gradient_accumulation_with_remat_equals_one_large_batch(tmp_path):
    """LoRA on the ViT, connector and LLM, layers rematerialised: 4 micro-batches of 1 = one batch of 4."""
    from batches import collate, example
    from test_training import MODEL

    examples = [example(10 + i, i % 2 == 0) for i in range(4)]
    model = MODEL.replace(remat_policy="full")
    results = {}
    for accum, batch in ((4, stack_micro_batches([collate([e]) for e in examples])),
                         (1, stack_micro_batches([collate(examples)]))):
        ts = make_train_step(model, lora_train_config(tmp_path, targets=".*/kernel", grad_accum=accum))
        ts.set_base(0)
        state, metrics = ts.step(ts.init_state(0), batch)
        results[accum] = jax.device_get(flatten(state["params"])), jax.device_get(metrics)
    (params4, m4), (params1, m1) = results[4], results[1]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert any(p.startswith("vision/") and not np.all(v == 0) for p, v in params1.items() if p.endswith("lora_b"))
    for path in params1:  # Adam's first step moves each element by ~lr (3e-2); see test_training
        np.testing.assert_allclose(params4[path], params1[path], rtol=0, atol=3e-4, err_msg=path)
