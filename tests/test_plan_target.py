"""`molmo2-jax plan --target TOPOLOGY`: the training step compiled for a TPU topology by libtpu (no TPU needed).
Skipped where libtpu is not installed (`pip install 'molmo2-jax[tpu]'`); the missing-libtpu message is tested
where it is absent."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from test_plan import ROOT, _plan, _row, cpu_env

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install 'molmo2-jax[tpu]')")
# the tiny model with a 131,072-token vocabulary: embedding and lm_head large enough for the GiB columns to mean
# something, still a quick compile
WIDE_TINY = ["text.vocab_size=131072", "text.hidden_size=1024", "adapter.text_hidden_size=1024"]


def _error(proc) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@needs_libtpu
@pytest.mark.slow
def test_tiny_step_with_the_pallas_kernel_compiles_for_v5e():
    proc = _plan("--model", "tiny", "--target", "v5e:2x2", "--mesh", "fsdp=2,sequence=2", "--batch", "4", "--seq",
                 "1024", "--crops", "2", "--tokens", "392", *WIDE_TINY, "attention=pallas", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "(4 devices, tpu), compiled for v5e:2x2 (TPU v5 lite) by libtpu" in out
    assert "decoder Pallas kernel (512 x 512 tiles" in out
    # arguments are bookkeeping on TPU as on CPU: sharded params + AdamW moments + batch
    tpu, analytic = _row(out, "arguments")
    assert tpu == pytest.approx(analytic, rel=0.05), out
    peak = _row(out, "peak")[0]
    hbm = float(re.search(r"of ([\d.]+) GiB HBM per device", out).group(1))
    assert 15 < hbm < 17 and 0 < peak < hbm  # v5e: 16 GiB parts


@needs_libtpu
def test_pallas_forward_and_backward_kernels_compile_for_v5e():
    # bench/compile_pallas_attention.py: value_and_grad through the kernel for one v5e device, 512 x 512 tiles,
    # bfloat16, 32 heads over 8 KV heads, head_dim 128; a kernel over its VMEM fails the compile
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_pallas_attention.py"), "--targets", "v5e:2x2",
                           "--tiles", "512", "--tokens", "8192"], capture_output=True, text=True, env=cpu_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Mosaic kernels molmo2_attention molmo2_attention_dkv molmo2_attention_dq" in proc.stdout, proc.stdout


@needs_libtpu
@pytest.mark.slow
def test_hbm_overflow_is_one_line_with_tpu_figures():
    # fp32 logits over 131,072 tokens for 64 x 1024 tokens per device: 32 GiB before their softmax and gradient
    proc = _plan("--model", "tiny", "--target", "v5e:2x2", "--mesh", "fsdp=4", "--batch", "256", "--seq", "1024",
                 "--crops", "2", "--tokens", "392", *WIDE_TINY, timeout=1800)
    line = _error(proc)
    assert re.search(r"error: does not fit on v5e:2x2: .*HBM.*\d+(\.\d+)?G", line), line


@needs_libtpu
def test_two_slices_split_the_data_axis():
    proc = _plan("--model", "tiny", "--target", "v5e:2x2", "--slices", "2", "--mesh", "data=2,fsdp=4", "--batch", "8",
                 "--seq", "1024", "--crops", "2", "--tokens", "392", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(8 devices, tpu, 2 slices), compiled for 2 x v5e:2x2 (TPU v5 lite) by libtpu" in proc.stdout
    assert "fsdp spans" not in proc.stdout  # data takes both slices


@needs_libtpu
@pytest.mark.parametrize("target,mesh,message", [
    ("v9:2x2", "fsdp=4", "--target 'v9:2x2': libtpu has no such TPU topology"),
    ("v5p:3x3x3", "fsdp=27", "--target 'v5p:3x3x3': libtpu has no such TPU topology"),
    ("v5e:2x2", "fsdp=8", "mesh {'fsdp': 8} has 8 devices but 4 are available on --target v5e:2x2"),
    ("v5e:2x2 --slices 2", "tensor=8", "mesh data=1,fsdp=1,sequence=1,tensor=8 cannot be split between 2 TPU "
                                       "slices: data x fsdp must be a multiple of 2"),
    ("v5e:2x2 --slices 0", "fsdp=4", "--slices 0: a target has at least one slice"),
])
def test_bad_target_fails_before_compiling(target, mesh, message):
    line = _error(_plan("--model", "tiny", "--target", *target.split(), "--mesh", mesh, "--batch", "8", "--seq",
                        "1024", timeout=300))
    assert message in line, line


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_missing_libtpu_names_the_extra():
    line = _error(_plan("--model", "tiny", "--target", "v5e:2x2", "--mesh", "fsdp=4", "--batch", "8", "--seq", "1024",
                        timeout=300))
    assert "libtpu, which is not installed: pip install 'molmo2-jax[tpu]'" in line, line
