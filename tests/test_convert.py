"""HF -> ours conversion (`molmo2-jax convert`): identical params to a direct load, side files, progress, and
one-line errors with nothing written for bad sources and destinations."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import molmo2_jax
from molmo2_jax.checkpoint.convert import convert_hf_to_jax
from molmo2_jax.cli import main
from molmo2_jax.params import flatten


def test_converted_params_equal_direct_load(reference, tmp_path):
    family, _, src = reference
    lines = []
    convert_hf_to_jax(src, tmp_path / "out", log=lines.append)
    direct = flatten(molmo2_jax.load(src).params)
    restored = flatten(molmo2_jax.load(tmp_path / "out").params)
    assert set(direct) == set(restored)
    for path, value in direct.items():
        assert restored[path].dtype == value.dtype, path
        assert np.array_equal(np.asarray(restored[path]), np.asarray(value)), path
    assert (tmp_path / "out" / "generation_config.json").is_file()  # side files carried over
    assert not (tmp_path / "out" / ".scratch").exists()
    assert any("MB/s" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_bfloat16_conversion(reference, tmp_path):
    family, _, src = reference
    convert_hf_to_jax(src, tmp_path / "out", dtype="bfloat16", log=None)
    saved = json.loads((tmp_path / "out" / "molmo2_jax_config.json").read_text())
    assert saved["param_dtype"] == "bfloat16"
    direct = flatten(molmo2_jax.load(src).params)
    restored = flatten(molmo2_jax.load(tmp_path / "out", dtype="bfloat16").params)
    for path, value in direct.items():
        assert np.array_equal(np.asarray(restored[path]), np.asarray(value.astype("bfloat16"))), path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _not_a_checkpoint(src: Path, tmp: Path) -> Path:
    (tmp / "bad").mkdir()
    (tmp / "bad" / "notes.txt").write_text("hello")
    return tmp / "bad"


def _truncated(src: Path, tmp: Path) -> Path:
    bad = _copy(src, tmp / "bad")
    file = next(bad.glob("*.safetensors"))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return bad


def _wrong_shape(src: Path, tmp: Path) -> Path:
    bad = _copy(src, tmp / "bad")
    file = next(bad.glob("*.safetensors"))
    tensors = load_file(file)
    name = "model.transformer.blocks.1.mlp.ff_out.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, file, metadata={"format": "pt"})
    return bad


def _unknown_qk_norm(src: Path, tmp: Path) -> Path:
    bad = _copy(src, tmp / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["qk_norm_type"] = "layer"
    (bad / "config.json").write_text(json.dumps(config))
    return bad


BAD_SOURCES = {
    "not_a_checkpoint": (_not_a_checkpoint, "not a Molmo2 checkpoint"),
    "truncated_safetensors": (_truncated, "unreadable safetensors file"),
    "wrong_shape": (_wrong_shape, "wrong shape: model.transformer.blocks.1.mlp.ff_out.weight"),
    "unknown_qk_norm_type": (_unknown_qk_norm, "unknown qk_norm_type 'layer'"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_one_line_error_nothing_written(reference, tmp_path, capsys, case):
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("input validation does not depend on the family")
    make, message = BAD_SOURCES[case]
    bad = make(src, tmp_path)
    out = tmp_path / "out" / "ckpt"
    code = main(["convert", str(bad), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("molmo2-jax convert: error: ") and message in err[-1], err
    assert str(bad) in err[-1]  # names the offending directory or file
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary directory left behind


def test_non_empty_destination_refused_unless_overwrite(reference, tmp_path, capsys):
    family, _, src = reference
    if family != "qwen3":
        pytest.skip("destination handling does not depend on the family")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(src), str(dst)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"molmo2-jax convert: error: {dst}: destination exists and is not empty (pass --overwrite to "
                   "replace it)")
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert main(["convert", str(src), str(dst), "--overwrite"]) == 0
    assert (dst / "molmo2_jax_config.json").is_file() and not (dst / "keep.txt").exists()
