"""`molmo2-jax verify`: passes for a faithful conversion, fails (exit 1) for different weights, and reports bad
input as one line (exit 2)."""

import numpy as np
import pytest
from ref_model import make_reference

from molmo2_jax.checkpoint.convert import convert_hf_to_jax
from molmo2_jax.cli import main
from molmo2_jax.verify import compare


@pytest.fixture(scope="module")
def converted_dir(reference, tmp_path_factory):
    family, _, src = reference
    out = tmp_path_factory.mktemp(f"verify_{family}") / "jax"
    convert_hf_to_jax(src, out, log=None)
    return out


@pytest.mark.slow
def test_faithful_conversion_passes(reference, converted_dir, capsys):
    family, _, src = reference
    assert main(["verify", "--hf", str(src), "--jax", str(converted_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[1:5]}
    assert sorted(rows) == ["image", "text", "two_images", "video"]
    assert all(row[-1] == "ok" and float(row[2]) <= 1e-4 for row in rows.values()), out
    assert out[-1] == "PASS"


def test_other_weights_fail(reference, tmp_path, capsys):
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("the verdict does not depend on the family")
    make_reference(tmp_path / "other_hf", family, seed=1)
    convert_hf_to_jax(tmp_path / "other_hf", tmp_path / "other", log=None)
    code = main(["verify", "--hf", str(src), "--jax", str(tmp_path / "other"), "--cases", "text"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert "FAIL" in out[1] and out[-1].startswith("FAIL")


def test_bad_input_is_one_line(reference, tmp_path, capsys):
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("input validation does not depend on the family")
    assert main(["verify", "--hf", str(tmp_path), "--jax", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"molmo2-jax verify: error: {tmp_path}: not a Hugging Face Molmo2 checkpoint "
                   "(config.json + *.safetensors)"]


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(70, 11))
    same = compare("x", a, a)
    assert same.max_abs_diff == 0 and same.kl == 0 and same.top1 == 1
    b = a.copy()
    b[3, a[3].argmin()] += 100  # one position's argmax changes
    other = compare("x", a, b)
    assert other.max_abs_diff == pytest.approx(100) and other.kl > 0 and other.top1 == pytest.approx(69 / 70)
