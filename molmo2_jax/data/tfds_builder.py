"""The synthetic grounding set as a TFDS dataset in array_record files, and reading TFDS datasets with
`tfds.data_source`.

Media are stored as encoded bytes (PNG images, MPEG-4 videos) and text as JSON strings, so building and
reading need no TensorFlow (tfds serialises with its own protobuf copy and parses records with numpy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from molmo2_jax.data.synthetic import SyntheticConfig, make_example

CONFIG_FILE = "synthetic_config.json"
SETTINGS_FILE = "build_settings.json"  # everything the set was built from, for --reuse
TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"


def _bytes() -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(), dtype=np.object_)


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Shapes on plain backgrounds: pointing, counting, captions, QA (images) and tracking, counting (videos)."""

    # Not bumped for `clip`: sets built before it read as they are (`data_source` takes the features stored
    # with the data) and hold the same examples, so paths such as configs/train/tiny.yaml's stay valid.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    code_path = None  # nothing to download, so no checksums file to look up next to this module

    def __init__(self, *, synthetic: SyntheticConfig = SyntheticConfig(), **kwargs: Any):
        self.synthetic = synthetic
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": _bytes(), "task": _bytes(),
                "images": tfds.features.Tensor(shape=(None,), dtype=np.object_),  # PNG bytes per image
                "video": _bytes(),  # MPEG-4 bytes, b"" for image examples
                "clip": tfds.features.Tensor(shape=(None,), dtype=np.float64),  # [start, end] s, or [] for all
                "messages": _bytes(),  # JSON list of {"role", "content"}
                "truth": _bytes(),  # JSON: objects with their per-frame centres and masks, label, count, size
            }),
            metadata=tfds.core.MetadataDict(synthetic_config=self.synthetic.to_json()),
        )

    def _split_generators(self, dl_manager):
        return {TRAIN_SPLIT: self._generate_examples(TRAIN_SPLIT, self.synthetic.num_train),
                EVAL_SPLIT: self._generate_examples(EVAL_SPLIT, self.synthetic.num_eval)}

    def _generate_examples(self, split: str, count: int):
        for index in range(count):
            yield index, {"clip": np.zeros(0), **make_example(self.synthetic, split, index)}


def build(data_dir: str | Path, config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Generate both splits as array_record files under `data_dir`; returns the dataset version directory."""
    builder = SyntheticShapes(synthetic=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return Path(builder.data_dir)


def data_source(dataset_dir: str | Path, split: str):
    """Random-access source over a TFDS dataset directory (`.../name/version`) in array_record format."""
    from molmo2_jax.data.errors import DataError

    path = Path(dataset_dir)
    if not (path / "dataset_info.json").is_file():
        raise DataError(f"{path}: not a TFDS dataset directory (no dataset_info.json); build it with "
                        f"`molmo2-jax build-synthetic --out DIR` or point at NAME/VERSION inside a data_dir")
    builder = tfds.builder_from_directory(str(path))
    if split not in builder.info.splits:
        raise DataError(f"{path}: no split {split!r}; splits are {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def dataset_dir(root: str | Path) -> Path:
    """The TFDS version directory of a synthetic dataset built under `root`."""
    return Path(root) / "synthetic_shapes" / str(SyntheticShapes.VERSION)


def build_synthetic(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(), *, vocab_size: int = 640,
                    crop_size: int = 378, max_crops: int = 8, overwrite: bool = False, reuse: bool = False) -> Path:
    """Build the synthetic set under `out_dir`: the TFDS dataset, `tokenizer/` (sentencepiece trained on the
    train split's text, with the processor configs) and `synthetic_config.json`.

    Everything is written under a temporary name and renamed at the end, so `out_dir` is either complete
    or absent. With `reuse`, a set already at `out_dir` built from the same settings is kept as it is; one
    built from other settings is an error naming them (or is replaced, with `overwrite`). Returns `out_dir`.
    """
    import json
    import shutil
    import tempfile

    from molmo2_jax.data.errors import DataError
    from molmo2_jax.data.spm import processor_files, train_sentencepiece, write_tokenizer_dir
    from molmo2_jax.data.synthetic import RECORD_VERSION, corpus
    from molmo2_jax.preprocessing.image import ImageConfig

    try:
        ImageConfig(size=crop_size)  # the processor this writes must be able to tile
    except ValueError as e:
        raise DataError(str(e)) from None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory; choose another --out")
    processor = {"crop_size": crop_size, "max_crops": max_crops, "num_frames": max(16, config.video_frames + 1)}
    settings = {**json.loads(config.to_json()), "vocab_size": vocab_size, "crop_size": crop_size,
                "max_crops": max_crops, "processor_files": processor_files(**processor),
                "record_version": RECORD_VERSION}
    if reuse and (out / SETTINGS_FILE).is_file():
        built = json.loads((out / SETTINGS_FILE).read_text())
        if built == settings:
            return out
        if not overwrite:
            changed = ", ".join(f"{k} changed" if isinstance(v, dict) else f"{k} {built.get(k)} -> {v}"
                                for k, v in settings.items() if built.get(k) != v)
            raise DataError(f"{out} was built with other settings ({changed}); remove it, choose another --out "
                            "or pass --overwrite")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if reuse:  # e.g. a set from a version that wrote no settings file: nothing says how it was built
            raise DataError(f"{out} has no {SETTINGS_FILE}, so it cannot be reused; remove it, choose another "
                            "--out or pass --overwrite")
        raise DataError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_tokenizer_dir(train_sentencepiece(corpus(config), vocab_size), tmp / "tokenizer", **processor)
        build(tmp, config)
        shutil.rmtree(tmp / "downloads", ignore_errors=True)
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings) + "\n")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
