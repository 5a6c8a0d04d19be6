"""Training metrics: a FLOPs estimate for MFU, the progress line, and TensorBoard scalar event files.

The event writer encodes the few protobuf fields TensorBoard reads (Event{wall_time, step, summary{value{tag,
simple_value}}}) in TFRecord framing, so no TensorFlow / tensorboard package is needed.
"""

from __future__ import annotations

import math
import socket
import struct
import time
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


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if summary is not None:
        out += _field(5, summary)
    return out


class EventWriter:
    """Appends scalar summaries to `logdir/events.out.tfevents.*` (readable by TensorBoard)."""

    def __init__(self, logdir: str | Path):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = open(self.path, "ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(_field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
                           for tag, value in values.items() if math.isfinite(value))
        self._write(_event(step, time.time(), summary=summary))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
