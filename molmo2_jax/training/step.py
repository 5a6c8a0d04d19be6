"""The jitted train step: a pure function of plain pytrees `(state, batch) -> (state, metrics)` on a mesh.

State is `{"step": int32 [], "params": fp32 param tree, "opt_state": optax state}`, born in (and donated
back to) its shardings. A batch follows the training batch contract (`molmo2_jax.batch`: visual arrays per row)
with a leading micro-batch axis on every array: `input_ids [A, B, T]`, `pixel_values [A, B, crops, 729, 588]`,
`image_token_pooling [A, B, tokens, 4]`, ..., `target_ids` / `loss_weights [A, B, T]`, where A = `grad_accum`;
every array splits over the batch axes by its rows B. Gradients are summed over the A micro-batches (a
`lax.scan`) and the loss is normalised by the total loss weight of all of them, so accumulation equals one large
batch.

Mixed precision: params stay fp32 in the state (master weights); the forward pass runs in the model
config's compute `dtype` (e.g. bfloat16); logits, loss and optimizer are fp32.

LoRA (`train_config.lora.rank > 0`): the state's params are the fp32 adapters only (one lr group, "lora"); the
base params are frozen in the compute dtype, set once with `set_base` and passed to every step beside the state
(never donated, differentiated or saved), so gradients, optimizer state and checkpoints are adapter-sized.

    ts = make_train_step(model_config, train_config, mesh)
    state = ts.init_state(0)                       # or ts.init_state(params)
    state, metrics = ts.step(state, batch)          # numpy or jax arrays
    ts.jit_step(spec).lower(ts.abstract_state(), spec, ts.abstract_base()).compile()   # AOT, nothing allocated
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from molmo2_jax import distributed, host_memory, lora
from molmo2_jax.batch import INPUT_KEYS as MODEL_KEYS  # the model inputs of a batch
from molmo2_jax.batch import InputError, check_rows
from molmo2_jax.config import ConfigError, Molmo2Config, to_dict
from molmo2_jax.errors import Molmo2Error
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.params import abstract_params, flatten, init_params, logical_names, param_shardings, unflatten
from molmo2_jax.sharding import activate, batch_shardings, check_sequence, fitting_spec, logical_to_spec, make_mesh
from molmo2_jax.training.config import GroupConfig, TrainConfig, TrainConfigError
from molmo2_jax.training.loss import chunked_weighted_sums, weighted_sums
from molmo2_jax.training.optimizer import FROZEN, make_optimizer, param_labels, schedules

TARGET_KEYS = ("target_ids", "loss_weights")


class BatchError(Molmo2Error):
    """A training batch that does not follow the batch contract."""


class TrainStep:
    """Everything needed to run (or AOT-compile) training steps of one model on one mesh."""

    def __init__(self, model_config: Molmo2Config, train_config: TrainConfig, mesh: Mesh):
        if model_config.param_dtype != "float32":
            raise TrainConfigError(f"model.param_dtype is {model_config.param_dtype!r}; training keeps fp32 "
                                   "master weights (model.dtype sets the compute dtype)")
        self.model_config = model_config
        self.train_config = train_config
        self.mesh = mesh
        self.module = Molmo2(self.model_config)
        opt = train_config.optimizer
        self.lora = train_config.lora if train_config.lora.enabled else None
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.base: dict[str, Any] = {}  # LoRA: the frozen base params (`set_base`)
        self.base_shardings: dict[str, Any] = {}
        if self.lora is None:
            boxes, groups = abstract_params(self.model_config), opt.groups
            self.labels = param_labels(logical_names(self.model_config), opt)  # raises on a bad group
            self.param_shardings = param_shardings(model_config, mesh)  # fails fast on a mesh that does not fit
        else:
            try:
                boxes = lora.abstract_adapters(model_config, self.lora)  # raises on bad targets / rank
            except ConfigError as e:
                raise TrainConfigError(str(e)) from None
            groups = {"lora": GroupConfig(".*", self.lora.lr, self.lora.warmup_steps)}
            self.labels = {p: "lora" for p in flatten(boxes)}
            self.base_shardings = param_shardings(model_config, mesh)
            self.param_shardings = jax.tree_util.tree_map(
                lambda box: NamedSharding(mesh, logical_to_spec(box.names)), boxes,
                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        self.schedules = schedules(opt, train_config.steps, groups)
        self.tx = make_optimizer(unflatten(self.labels), opt, train_config.steps, groups)
        self._frozen = unflatten({p: label == FROZEN for p, label in self.labels.items()})
        self._abstract_params = jax.tree_util.tree_map(
            lambda box, sharding: jax.ShapeDtypeStruct(box.value.shape, jnp.float32, sharding=sharding),
            boxes, self.param_shardings, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        self._abstract_opt = jax.eval_shape(self.tx.init, self._abstract_params)
        flat_shardings = flatten(self.param_shardings)
        opt_shardings = jax.tree_util.tree_map_with_path(
            lambda path, _: flat_shardings.get(_param_path(path), self.replicated), self._abstract_opt)
        self.state_shardings = {"step": self.replicated, "params": self.param_shardings,
                                "opt_state": opt_shardings}
        self._jitted: dict[Any, Any] = {}

    # -- state ---------------------------------------------------------------------------------------------

    def abstract_state(self) -> dict[str, Any]:
        """ShapeDtypeStructs (with shardings) of the state; nothing is allocated."""
        opt = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                     self._abstract_opt, self.state_shardings["opt_state"])
        return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
                "params": self._abstract_params, "opt_state": opt}

    def abstract_base(self) -> dict[str, Any]:
        """LoRA: ShapeDtypeStructs (compute dtype, with shardings) of the frozen base params; else {}."""
        if self.lora is None:
            return {}
        dtype = jnp.dtype(self.model_config.dtype)
        return jax.tree_util.tree_map(lambda box, sharding: jax.ShapeDtypeStruct(box.value.shape, dtype,
                                                                                 sharding=sharding),
                                      abstract_params(self.model_config), self.base_shardings,
                                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

    def set_base(self, seed_or_params: int | Mapping[str, Any]) -> None:
        """LoRA: the frozen base params (random from a seed, or a param tree), cast to the compute dtype and
        placed in their shardings."""
        if isinstance(seed_or_params, (int, np.integer)):
            seed_or_params = init_params(self.model_config, int(seed_or_params), self.mesh)
        abstract = self.abstract_base()
        _check_shapes(abstract, seed_or_params)
        # a jax array keeps its sharding while cast; a host array is cast on the host, then placed in shards
        cast = lambda x, s: x.astype(s.dtype) if isinstance(x, jax.Array) else np.asarray(x, s.dtype)
        self.base = jax.tree_util.tree_map(lambda x, s: jax.device_put(cast(x, s), s.sharding),
                                           dict(seed_or_params), abstract)

    def init_state(self, seed_or_params: int | Mapping[str, Any]) -> dict[str, Any]:
        """A fresh state from a random seed or from a param tree (cast to fp32 and placed in its shardings).
        With LoRA these are the adapters (from a seed: A random, B = 0)."""
        if isinstance(seed_or_params, (int, np.integer)) and self.lora is not None:
            params = lora.init_adapters(self.model_config, self.lora, int(seed_or_params), self.param_shardings)
        elif isinstance(seed_or_params, (int, np.integer)):
            params = jax.device_put(init_params(self.model_config, int(seed_or_params), self.mesh),
                                    self.param_shardings)
        else:
            self.check_params(seed_or_params)
            as_fp32 = lambda x: x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, np.float32)
            params = jax.device_put(jax.tree_util.tree_map(as_fp32, dict(seed_or_params)), self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        return {"step": jax.device_put(jnp.zeros((), jnp.int32), self.replicated), "params": params,
                "opt_state": opt_state}

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raise TrainConfigError naming the first params whose paths or shapes differ from this model's."""
        _check_shapes(self._abstract_params, params)

    # -- batches ---------------------------------------------------------------------------------------------

    def batch_shardings(self, batch_spec: Mapping[str, Any]) -> dict[str, NamedSharding]:
        """Shardings for a batch (arrays or ShapeDtypeStructs): the micro-batch axis replicated, then each
        micro-batch laid out as `sharding.batch_shardings` lays out one batch."""
        if "input_ids" in batch_spec:
            check_sequence(self.mesh, np.shape(batch_spec["input_ids"])[-1])
        micro = {k: jax.ShapeDtypeStruct(np.shape(v)[1:], jnp.int32) for k, v in batch_spec.items()}
        return {k: NamedSharding(self.mesh, PartitionSpec(None, *s.spec))
                for k, s in batch_shardings(self.mesh, micro).items()}

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        unknown = sorted(set(batch) - set(MODEL_KEYS) - set(TARGET_KEYS))
        missing = [k for k in ("input_ids", *TARGET_KEYS) if k not in batch]
        if unknown or missing:
            raise BatchError(f"training batch has unknown key(s) {unknown} / lacks {missing}; expected "
                             f"{list(MODEL_KEYS + TARGET_KEYS)}")
        a = self.train_config.grad_accum
        for key, value in batch.items():
            if np.ndim(value) < 2 or np.shape(value)[0] != a:
                raise BatchError(f"batch[{key!r}] has shape {np.shape(value)}; every array needs a leading "
                                 f"micro-batch axis of grad_accum={a}")
        if np.shape(batch["target_ids"]) != np.shape(batch["input_ids"]):
            raise BatchError(f"target_ids {np.shape(batch['target_ids'])} and input_ids "
                             f"{np.shape(batch['input_ids'])} differ in shape")
        for i in range(a):  # visual arrays per row (`batch.to_rows` converts the transformers layout)
            try:
                check_rows({k: np.asarray(v[i]) for k, v in batch.items() if k in MODEL_KEYS},
                           self.model_config.tokens.image_patch)
            except InputError as e:
                raise BatchError(f"training batch, micro-batch {i}: {e}") from None

    # -- the step --------------------------------------------------------------------------------------------

    def loss_chunks(self, rows: int, length: int) -> int:
        """How many chunks the loss of a `[rows, length]` micro-batch runs in (0: the plain loss). Raises
        TrainConfigError, at trace time (before anything compiles), when `loss_chunk_tokens` does not fit."""
        tokens = self.train_config.loss_chunk_tokens
        if not tokens:
            return 0
        # one device's slice of the micro-batch: rows over data x fsdp where they divide, as batch_shardings lays
        # them out; the sequence over the sequence axis
        local = NamedSharding(self.mesh, fitting_spec(self.mesh, ("act_batch", "act_length"), (rows, length)))
        rows, length = local.shard_shape((rows, length))
        per_row, rest = divmod(tokens, rows)
        if rest or not per_row or length % per_row:
            raise TrainConfigError(f"loss_chunk_tokens={tokens} does not fit a device's {rows} row(s) x {length} "
                                   f"tokens: use {rows} x a divisor of {length} (or 0 for the plain loss)")
        return length // per_row

    def _loss_sums(self, params, base, micro_batch, dropout_key=None):
        inputs = {k: v for k, v in micro_batch.items() if k in MODEL_KEYS}
        chunks = self.loss_chunks(*np.shape(micro_batch["input_ids"]))
        if self.lora is None:
            params = jax.tree_util.tree_map(lambda x, frozen: jax.lax.stop_gradient(x) if frozen else x,
                                            params, self._frozen)
            out, _ = self.module.apply({"params": params}, **inputs, return_hidden=bool(chunks))
        else:
            rngs = {} if dropout_key is None else {"dropout": dropout_key}
            params = lora.combine(base, params)
            with lora.applied(self.lora, deterministic=dropout_key is None):
                out, _ = self.module.apply({"params": params}, **inputs, rngs=rngs, return_hidden=bool(chunks))
        if chunks:  # `out` is the final hidden states; the LM head is applied chunk by chunk
            return chunked_weighted_sums(out, params["lm_head"], micro_batch["target_ids"],
                                         micro_batch["loss_weights"], chunks)
        return weighted_sums(out, micro_batch["target_ids"], micro_batch["loss_weights"])

    def _dropout_keys(self, step, count: int):
        """LoRA dropout keys of one step's micro-batches (a function of the step: resuming replays them)."""
        if self.lora is None or not self.lora.dropout:
            return None
        return jax.random.split(jax.random.fold_in(jax.random.key(self.train_config.init.seed), step), count)

    def gradients(self, params, batch, base=None, step=None):
        """`(grads, sums)` of one optimizer batch: the gradients of `(ce + z_loss_scale * z) / total loss weight`,
        summed over the micro-batches (so accumulation equals one large batch), and the un-normalised loss sums
        of `loss.weighted_sums` summed likewise. `step` applies exactly these gradients (frozen params get zero).
        With LoRA, `params` are the adapters, `base` the frozen base and `step` seeds the adapters' dropout."""
        z_scale = self.train_config.optimizer.z_loss_scale
        total = jnp.sum(batch["loss_weights"].astype(jnp.float32))
        norm = jnp.where(total > 0, total, 1.0)

        def micro(grads, micro_and_key):
            micro_batch, key = micro_and_key

            def loss_fn(params):
                sums = self._loss_sums(params, base, micro_batch, key)
                return (sums["ce"] + z_scale * sums["z"]) / norm, sums

            (_, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return jax.tree_util.tree_map(jnp.add, grads, g), sums

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        keys = None if step is None else self._dropout_keys(step, self.train_config.grad_accum)
        if self.train_config.grad_accum == 1:  # no loop around the model (XLA folds the add to zeros away)
            return micro(zeros, jax.tree_util.tree_map(lambda x: x[0], (batch, keys)))
        grads, sums = jax.lax.scan(micro, zeros, (batch, keys))
        return grads, jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), sums)

    def _train_step(self, state, batch, base):
        z_scale = self.train_config.optimizer.z_loss_scale
        grads, sums = self.gradients(state["params"], batch, base, state["step"])
        total = sums["weight"]
        norm = jnp.where(total > 0, total, 1.0)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": (sums["ce"] + z_scale * sums["z"]) / norm, "ce_loss": sums["ce"] / norm,
            "z_loss": sums["z"] / norm, "accuracy": sums["correct"] / norm, "loss_weight": total,
            "grad_norm": optax.global_norm(grads),
            **{f"lr/{name}": schedule(state["step"]) for name, schedule in self.schedules.items()},
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def _eval_step(self, params, batch, base):
        sums = jax.lax.map(lambda mb: self._loss_sums(params, base, mb), batch)
        return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), sums)

    def _signature(self, batch_spec: Mapping[str, Any]):
        return tuple(sorted((k, tuple(np.shape(v)), str(getattr(v, "dtype", ""))) for k, v in batch_spec.items()))

    def jit_step(self, batch_spec: Mapping[str, Any]):
        """The jitted `(state, batch, base) -> (state, metrics)` for batches shaped like `batch_spec`, with input
        and output shardings and the state donated (`base`: `self.base`, or `abstract_base()` to lower). Call it
        (or `.lower(...)`) inside `self.context()`."""
        key = ("train", self._signature(batch_spec))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(
                self._train_step, in_shardings=(self.state_shardings, self.batch_shardings(batch_spec),
                                                self.base_shardings),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
        return self._jitted[key]

    def jit_eval(self, batch_spec: Mapping[str, Any]):
        """The jitted `(params, batch, base) -> loss sums` (ce, z, weight, correct) for held-out batches."""
        key = ("eval", self._signature(batch_spec))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(
                self._eval_step, in_shardings=(self.param_shardings, self.batch_shardings(batch_spec),
                                               self.base_shardings),
                out_shardings=self.replicated)
        return self._jitted[key]

    def context(self):
        """The mesh and logical-axis rules under which steps are traced (the model's activation constraints)."""
        return activate(self.mesh)

    def place_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Check a host batch and put it on the mesh in its shardings. With several processes, each passes its own
        examples (padded to the shapes all agreed on, `distributed.agree`) and gets global arrays of all of them."""
        self.check_batch(batch)
        if jax.process_count() == 1:
            return host_memory.placed(jax.device_put(dict(batch), self.batch_shardings(batch)))
        return host_memory.placed(distributed.global_batch(batch, self.batch_shardings, axis=1))

    def step(self, state: dict[str, Any], batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """One optimizer step (the state is donated: do not reuse the one passed in)."""
        batch = self.place_batch(batch)
        with self.context():
            return self.jit_step(batch)(state, batch, self.base)

    def evaluate(self, params: dict[str, Any], batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        batch = self.place_batch(batch)
        with self.context():
            return self.jit_eval(batch)(params, batch, self.base)


def _check_shapes(abstract: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Raise TrainConfigError naming the first params whose paths or shapes differ from `abstract`'s."""
    want = {p: tuple(s.shape) for p, s in flatten(abstract).items()}
    got = {p: tuple(np.shape(x)) for p, x in flatten(params).items()}
    problems = [f"missing {p}" for p in sorted(set(want) - set(got))]
    problems += [f"unexpected {p}" for p in sorted(set(got) - set(want))]
    problems += [f"{p} has shape {got[p]}, the model needs {want[p]}"
                 for p in sorted(set(want) & set(got)) if got[p] != want[p]]
    if problems:
        raise TrainConfigError(f"params do not fit the model config ({len(problems)} problem(s)): "
                               + "; ".join(problems[:4]))


def _param_path(key_path) -> str:
    """The param path ("a/b/c") at the end of an optimizer-state key path (its trailing dict keys)."""
    names = []
    for key in reversed(key_path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        names.append(str(key.key))
    return "/".join(reversed(names))


def make_train_step(model_config: Molmo2Config, train_config: TrainConfig, mesh: Mesh | None = None) -> TrainStep:
    """A TrainStep on `mesh` (default: the train config's mesh over all devices)."""
    return TrainStep(model_config, train_config, mesh if mesh is not None else make_mesh(to_dict(train_config.mesh)))
