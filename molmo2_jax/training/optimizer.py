"""AdamW with one learning-rate schedule per module group (connector / ViT / LLM), gradient clipping and
regex freezing. Every param belongs to exactly one group; a group that matches no param is an error."""

from __future__ import annotations

import re
from collections.abc import Iterable

import optax

from molmo2_jax.training.config import GroupConfig, OptimizerConfig, TrainConfigError

FROZEN = "frozen"


def param_labels(paths: Iterable[str], config: OptimizerConfig) -> dict[str, str]:
    """`{param path: group name}` ("frozen" for params matching `config.freeze`).

    Raises TrainConfigError, before anything is compiled, when a group matches no param, a param matches no
    group or several, or the freeze pattern matches nothing.
    """
    paths = sorted(paths)
    labels: dict[str, str] = {}
    for name, group in config.groups.items():
        pattern = _compile(group.pattern, f"optimizer.{name}.pattern")
        matched = [p for p in paths if pattern.fullmatch(p)]
        if not matched:
            raise TrainConfigError(f"optimizer.{name}.pattern {group.pattern!r} matches no parameter; "
                                   f"parameter paths look like {paths[:3]}")
        for p in matched:
            if p in labels:
                raise TrainConfigError(f"parameter {p!r} matches both optimizer.{labels[p]} and optimizer.{name}")
            labels[p] = name
    orphans = [p for p in paths if p not in labels]
    if orphans:
        raise TrainConfigError(f"{len(orphans)} parameter(s) match no optimizer group, e.g. {orphans[:3]}")
    if config.freeze:
        pattern = _compile(config.freeze, "optimizer.freeze")
        frozen = [p for p in paths if pattern.fullmatch(p)]
        if not frozen:
            raise TrainConfigError(f"optimizer.freeze {config.freeze!r} matches no parameter")
        labels.update({p: FROZEN for p in frozen})
    return labels


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TrainConfigError(f"{where} {pattern!r} is not a valid regex ({e})") from None


def schedules(config: OptimizerConfig, total_steps: int,
              groups: dict[str, GroupConfig] | None = None) -> dict[str, optax.Schedule]:
    """Per group (default: the config's): linear warmup from 0 to `lr`, then cosine decay to
    `final_lr_ratio * lr` at `total_steps`."""
    out = {}
    for name, g in (config.groups if groups is None else groups).items():
        warmup = min(g.warmup_steps, total_steps)
        out[name] = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=g.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
            end_value=g.lr * config.final_lr_ratio)
    return out


def make_optimizer(labels_tree, config: OptimizerConfig, total_steps: int,
                   groups: dict[str, GroupConfig] | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW per group; frozen params get zero updates and no optimizer state.

    `labels_tree` has the structure of the params with a group name at each leaf. Frozen grads are already
    zero (stopped in the loss), so they do not count towards the clipping norm.
    """
    transforms = {
        name: optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
        for name, schedule in schedules(config, total_steps, groups).items()
    }
    transforms[FROZEN] = optax.set_to_zero()
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.multi_transform(transforms, labels_tree))
