"""Check a converted checkpoint against the transformers reference on fixed inputs.

Both sides get the same token ids and pixel arrays: seeded text ids, one image, two images and a short video
laid out as the released processor does (`<low_res_im_start>` view, `<im_start>` crop rows ending in
`<im_col>`, `<frame_start>`/`<frame_end>` per frame), pixels from the transformers image and video
processors. The reference runs first and is freed before ours loads, so peak memory is one model plus
logits. Reports max |logit difference|, KL(reference || ours) averaged over positions and top-1 agreement.
Needs torch and transformers (the reference); they are not needed anywhere else at run time.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from molmo2_jax.checkpoint import hf
from molmo2_jax.checkpoint.formats import open_checkpoint
from molmo2_jax.config import Molmo2Config, TokenIds

CASES = ("text", "image", "two_images", "video")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float | None  # None: not checked (bfloat16 logits differ by rounding)
    kl: float
    top1: float


THRESHOLDS = {"float32": Thresholds(max_abs_diff=2e-3, kl=1e-5, top1=0.99),
              "bfloat16": Thresholds(max_abs_diff=None, kl=1e-2, top1=0.9)}


@dataclasses.dataclass(frozen=True)
class Comparison:
    case: str
    tokens: int
    max_abs_diff: float
    kl: float
    top1: float

    def passes(self, limits: Thresholds) -> bool:
        return ((limits.max_abs_diff is None or self.max_abs_diff <= limits.max_abs_diff)
                and self.kl <= limits.kl and self.top1 >= limits.top1)


def fixed_inputs(config: Molmo2Config, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The verification inputs, as transformers Molmo2Processor-style dicts of numpy arrays (batch 1)."""
    from transformers import Molmo2ImageProcessor, Molmo2VideoProcessor

    rng = np.random.default_rng(seed)
    k = config.tokens
    text = lambda n: rng.integers(0, config.text.vocab_size, n).tolist()
    image = lambda w, h: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def with_images(images: list[np.ndarray]) -> dict[str, np.ndarray]:
        processed = Molmo2ImageProcessor()(images=images, return_tensors="np")
        ids = text(5)
        for grid in processed["image_grids"]:
            low_h, low_w, rows, cols = (int(x) for x in grid)
            ids += [k.low_res_image_start] + [k.image_patch] * (low_h * low_w) + [k.image_end]
            ids += [k.image_start] + ([k.image_patch] * cols + [k.image_col]) * rows + [k.image_end] + text(3)
        return _with_masks(ids + text(6), k, processed)

    def with_video(num_frames: int) -> dict[str, np.ndarray]:
        frames = rng.integers(0, 256, (num_frames, 96, 128, 3), dtype=np.uint8)
        processed = Molmo2VideoProcessor()(videos=[frames], do_sample_frames=False, fps=2.0, return_tensors="np")
        n, rows, cols = (int(x) for x in processed["video_grids"][0])
        ids = text(5)
        for _ in range(n):
            ids += text(2) + [k.frame_start] + [k.image_patch] * (rows * cols) + [k.frame_end]
        return _with_masks(ids + text(6), k, processed)

    return {"text": _with_masks(text(48), k, {}),
            "image": with_images([image(378, 378)]),
            "two_images": with_images([image(300, 200), image(200, 420)]),
            "video": with_video(3)}


def _with_masks(ids: list[int], k: TokenIds, extra: dict) -> dict[str, np.ndarray]:
    input_ids = np.asarray([ids], np.int64)
    kept = {key: np.asarray(v) for key, v in extra.items()}
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
            "mm_token_type_ids": np.isin(input_ids, k.multimodal).astype(np.int64), **kept}


def reference_logits(hf_dir: Path, inputs: dict[str, dict[str, np.ndarray]], dtype: str) -> dict[str, np.ndarray]:
    """Logits of transformers' Molmo2ForConditionalGeneration for each input (float32 numpy)."""
    try:
        import torch
        from transformers import Molmo2ForConditionalGeneration
    except ImportError as e:
        raise hf.CheckpointError(f"verify needs torch and transformers for the reference model ({e})") from None
    model = Molmo2ForConditionalGeneration.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    out = {}
    with torch.no_grad():
        for case, arrays in inputs.items():
            tensors = {key: torch.from_numpy(v) for key, v in arrays.items()}
            out[case] = model(**tensors).logits.float().numpy()[0]
    del model
    gc.collect()
    return out


def compare(case: str, reference: np.ndarray, ours: np.ndarray, rows: int = 64) -> Comparison:
    """Metrics between two `[tokens, vocab]` logit arrays (in float64, a block of rows at a time)."""
    max_diff = kl_sum = agree = 0.0
    for start in range(0, reference.shape[0], rows):
        p = reference[start:start + rows].astype(np.float64)
        q = ours[start:start + rows].astype(np.float64)
        max_diff = max(max_diff, float(np.max(np.abs(p - q))))
        log_p, log_q = _log_softmax(p), _log_softmax(q)
        kl_sum += float(np.sum(np.exp(log_p) * (log_p - log_q)))
        agree += float(np.sum(p.argmax(-1) == q.argmax(-1)))
    n = reference.shape[0]
    return Comparison(case, n, max_diff, max(kl_sum / n, 0.0), agree / n)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def verify(hf_dir: str | Path, jax_dir: str | Path, *, dtype: str = "float32", cases: tuple[str, ...] = CASES,
           log: Callable[[str], None] | None = print) -> list[Comparison]:
    """Run the reference (from `hf_dir`) and ours (from `jax_dir`, any checkpoint format) on the fixed inputs."""
    import jax

    import molmo2_jax

    hf_dir, jax_dir = Path(hf_dir), Path(jax_dir)
    say = log or (lambda message: None)
    if dtype not in THRESHOLDS:
        raise hf.CheckpointError(f"--dtype {dtype!r}: expected one of {sorted(THRESHOLDS)}")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise hf.CheckpointError(f"unknown case(s) {unknown}; expected among {list(CASES)}")
    if not hf.is_hf_checkpoint(hf_dir):
        raise hf.CheckpointError(f"{hf_dir}: not a Hugging Face Molmo2 checkpoint (config.json + *.safetensors)")
    open_checkpoint(jax_dir)  # any format; a wrong directory fails before the reference runs
    config = hf.read_config(hf_dir)
    inputs = {case: arrays for case, arrays in fixed_inputs(config).items() if case in cases}
    say(f"reference: {hf_dir} ({dtype})")
    expected = reference_logits(hf_dir, inputs, dtype)
    say(f"ours: {jax_dir} ({dtype})")
    model = molmo2_jax.load(jax_dir, dtype=dtype)
    results = []
    with jax.default_matmul_precision("highest"):
        for case, arrays in inputs.items():
            results.append(compare(case, expected[case], np.asarray(model(arrays), np.float32)[0]))
    return results


def report(results: list[Comparison], limits: Thresholds) -> tuple[str, bool]:
    """A table of the metrics with the thresholds, and whether every case passes."""
    lines = [f"{'input':<11} {'tokens':>6} {'max|diff|':>10} {'KL':>10} {'top-1':>7}  result"]
    for r in results:
        lines.append(f"{r.case:<11} {r.tokens:>6} {r.max_abs_diff:>10.2e} {r.kl:>10.2e} {r.top1:>7.4f}  "
                     f"{'ok' if r.passes(limits) else 'FAIL'}")
    diff = "-" if limits.max_abs_diff is None else f"{limits.max_abs_diff:.0e}"
    lines.append(f"thresholds: max|diff| <= {diff}, KL <= {limits.kl:.0e}, top-1 >= {limits.top1}")
    return "\n".join(lines), all(r.passes(limits) for r in results)
