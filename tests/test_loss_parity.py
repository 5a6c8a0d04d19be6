"""Training loss and gradients of every parameter against the transformers reference (float32, highest precision),
for a Qwen3-style and an Olmo3-style tiny model.

The reference's loss convention (`Molmo2ForConditionalGeneration(..., labels=labels).loss`, transformers'
`ForCausalLMLoss`): `labels` are `[B, T]` input ids with -100 where no loss is taken; the model shifts them
itself, so the logits at position t are scored against `labels[t + 1]` (the last position against nothing), and
the loss is the mean cross-entropy over every non-ignored target of the whole batch (one mean over all tokens,
not a mean of per-row means; `accepts_loss_kwargs = False`, so no `num_items_in_batch` normalisation) — no z-loss.
Ours: `target_ids[t]` and `loss_weights[t]` are aligned with the logits, and the step's loss is
`sum(w * ce) / sum(w)` (+ a z-loss, off here). `targets_from_labels` maps their labels to ours (the shift, weight
1 where the shifted label is not -100), after which the two losses and their gradients are the same function.

Gradients are taken through `TrainStep.gradients` (what the step applies) and compared with torch autograd's,
mapped onto our param tree by the checkpoint import table (`hf.import_arrays`, native layout), per param as
`max |ours - reference| / max |reference|` <= 1e-4.
"""

import jax
import numpy as np
import pytest
import torch
from ref_model import image_inputs, padded_batch, random_image, video_inputs

import molmo2_jax
from molmo2_jax.batch import to_rows
from molmo2_jax.checkpoint.hf import import_arrays
from molmo2_jax.params import flatten, param_shapes
from molmo2_jax.training.config import OptimizerConfig, TrainConfig
from molmo2_jax.training.loss import targets_from_labels, weighted_sums
from molmo2_jax.training.step import MODEL_KEYS, make_train_step

GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5
PROMPT = 3  # leading tokens without loss, like a prompt
# Gradients that are zero in exact arithmetic: a key bias adds the same q.b to every score of a query, which the
# softmax ignores (the ViT and connector attention masks do not depend on the query). Both sides must be rounding
# noise, far below the model's largest gradient.
ZERO_GRADIENTS = ("vision/blocks/k/bias", "connector/k/bias")

CASES = {
    "image": lambda: image_inputs([random_image(300, 200, 2)], text_after=12),
    "video_frame_tokens": lambda: video_inputs(3, seed=1, frame_special_tokens=True),
    "video_image_tokens": lambda: video_inputs(3, seed=1, frame_special_tokens=False),  # released 4B/8B files
    "padded_batch": lambda: padded_batch([image_inputs([random_image(300, 200, 2)], seed=2, text_after=12),
                                          image_inputs([random_image(500, 300, 3)], seed=3, text_after=20)]),
}


def reference_labels(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The input ids with -100 on the prompt, the image/frame tokens and the padding."""
    labels = np.where((inputs["mm_token_type_ids"] == 1) | (inputs["attention_mask"] == 0), -100,
                      inputs["input_ids"])
    labels[:, :PROMPT] = -100
    return labels


def test_targets_from_labels():
    labels = np.array([[5, -100, 7, 8, 9], [-100, 3, 4, -100, -100]])
    target_ids, loss_weights = targets_from_labels(labels)
    np.testing.assert_array_equal(target_ids, [[0, 7, 8, 9, 0], [3, 4, 0, 0, 0]])
    np.testing.assert_array_equal(loss_weights, [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])


def test_loss_convention_matches_reference_loss_function(reference):
    """On random logits, rows with different numbers of targets: one mean over all targets of the batch."""
    family, ref, _ = reference
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 7, ref.vocab_size)).astype(np.float32)
    labels = np.array([[-100, 4, 5, 6, 7, 8, 9], [-100, -100, -100, 4, 5, -100, -100]])
    expected = float(ref.loss_function(logits=torch.from_numpy(logits), labels=torch.from_numpy(labels),
                                       vocab_size=ref.vocab_size))
    sums = weighted_sums(logits, *targets_from_labels(labels))
    assert float(sums["ce"] / sums["weight"]) == pytest.approx(expected, rel=LOSS_RTOL)


@pytest.fixture(scope="module")
def trainable(reference):
    """Our model loaded from the reference checkpoint, and a train step for it with the z-loss off."""
    family, ref, path = reference
    model = molmo2_jax.load(path)
    return model, make_train_step(model.config, TrainConfig(optimizer=OptimizerConfig(z_loss_scale=0.0)))


def reference_loss_and_grads(ref, inputs: dict[str, np.ndarray], labels: np.ndarray):
    """The reference loss and `{native tensor name: gradient}`, in train mode (dropout is 0 in the tiny configs)."""
    params = dict(ref.named_parameters())
    ref.train()
    try:
        out = ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, labels=torch.from_numpy(labels))
        grads = torch.autograd.grad(out.loss, list(params.values()))  # fails if any param is outside the graph
    finally:
        ref.eval()
    return out.loss.item(), {name: g.numpy() for name, g in zip(params, grads)}


def our_loss_and_grads(model, train_step, inputs: dict[str, np.ndarray], labels: np.ndarray):
    target_ids, loss_weights = targets_from_labels(labels)
    rows = to_rows({k: np.asarray(v) for k, v in inputs.items() if k in MODEL_KEYS}, model.config.tokens.image_patch)
    batch = {k: v[None] for k, v in rows.items()}  # one micro-batch of the batch contract (visual arrays per row)
    batch.update(target_ids=target_ids[None], loss_weights=loss_weights[None])
    batch = train_step.place_batch(batch)
    with train_step.context():
        grads, sums = jax.jit(train_step.gradients)(model.params, batch)
    return float(sums["ce"] / sums["weight"]), flatten(grads)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_reference(reference, trainable, case):
    family, ref, _ = reference
    model, train_step = trainable
    inputs = CASES[case]()
    labels = reference_labels(inputs)
    assert (labels != -100).sum(axis=1).min() >= 8

    ref_loss, ref_grads = reference_loss_and_grads(ref, inputs, labels)
    loss, grads = our_loss_and_grads(model, train_step, inputs, labels)
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), f"{family}/{case}"

    expected = import_arrays(ref_grads, model.config, param_shapes(model.config))  # every tensor, once
    assert set(expected) == set(grads)
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    rel = {}
    for path, want in expected.items():
        got, want = np.asarray(grads[path], np.float64), np.asarray(want, np.float64)
        if path in ZERO_GRADIENTS:  # rounding noise on both sides
            assert max(np.max(np.abs(want)), np.max(np.abs(got))) <= 1e-6 * scale, f"{family}/{case}: {path}"
            continue
        assert np.max(np.abs(want)) > 0, path
        rel[path] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    worst = max(rel, key=rel.get)
    print(f"{family}/{case}: loss {loss:.6f} (reference {ref_loss:.6f}); max relative gradient difference "
          f"{rel[worst]:.2e} ({worst})")
    bad = {p: f"{r:.2e}" for p, r in rel.items() if r > GRAD_RTOL}
    assert not bad, f"{family}/{case}: gradients differ from the reference: {bad}"
