"""Training metrics: a FLOPs estimate for MFU, the progress line, and TensorBoard scalar event files."""

from __future__ import annotations

import math
from pathlib import Path

import jax

from molmo2_jax.config import Molmo2Config

# Dense bf16 peak TFLOP/s per device, matched on the lower-cased device kind.
PEAK_TFLOPS = (("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0),
               ("h200", 989.0), ("h100", 989.0), ("a100", 312.0))


def peak_tflops(device: jax.Device) -> float | None:
    kind = device.device_kind.lower()
    return next((tflops for key, tflops in PEAK_TFLOPS if key in kind), None)


def train_flops(config: Molmo2Config, tokens: int, crops: int, visual_tokens: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward, matmuls only, causal attention
    halved): `tokens` LLM tokens in sequences of `seq_len`, `crops` ViT crops, `visual_tokens` pooled tokens."""
    t, v, a = config.text, config.vision, config.adapter
    d, hq, hkv = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    llm_layer = d * (hq + 2 * hkv) + hq * d + 3 * d * t.intermediate_size
    llm = 2 * tokens * (t.num_layers * llm_layer + d * t.vocab_size)
    llm += 2 * t.num_layers * tokens * seq_len * hq  # causal q.k and attn.v: 2 * 2 * T^2 * hq / 2 per sequence
    dv, p = v.hidden_size, v.num_patches
    vit_layer = 4 * dv * dv + 2 * dv * v.intermediate_size
    vit = 2 * crops * p * (v.patch_dim * dv + v.num_layers * vit_layer) + 4 * v.num_layers * crops * p * p * dv
    feat = len(a.vit_layers) * dv
    connector = 2 * visual_tokens * (feat * 3 * a.hidden_size + a.hidden_size ** 2 +
                                     3 * a.hidden_size * a.intermediate_size)
    return 3.0 * (llm + vit + connector)


def progress_line(step: int, total: int, metrics: dict[str, float], tokens_per_s: float, mfu: float | None,
                  data_wait: float) -> str:
    lrs = " ".join(f"{k[3:]} {v:.2e}" for k, v in sorted(metrics.items()) if k.startswith("lr/"))
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    return (f"step {step}/{total} | loss {metrics['loss']:.4f} (z {metrics['z_loss']:.2f}) | "
            f"grad_norm {metrics['grad_norm']:.3f} | lr {lrs} | {tokens_per_s:,.0f} tok/s | MFU {mfu_text} | "
            f"data wait {100 * data_wait:.1f}%")


# ----------------------------------------------------------------------------------------------------
# TensorBoard event files


class EventWriter:
    """Scalar summaries in TensorBoard event files under `logdir` (written by tensorboardX)."""

    def __init__(self, logdir: str | Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
