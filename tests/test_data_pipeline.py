"""The Grain pipeline: resume mid-epoch at exactly the next batch, disjoint host shards that cover the data,
mixture rates, bad examples skipped / counted / fatal past the configured share, worker processes."""

import dataclasses
import json
import logging

import numpy as np
import pytest
from test_data_common import qa, synthetic_root, write_manifest, write_media  # noqa: F401  (fixture)

from molmo2_jax.data.errors import DataError, TooManyBadExamplesError
from molmo2_jax.data.packing import fill_stats
from molmo2_jax.data.pipeline import PipelineConfig, Source, dataset, examples, mixture_counts, records
from molmo2_jax.data.tfds_builder import dataset_dir
from molmo2_jax.preprocessing.collate import Bucket

BUCKETS = (Bucket(seq_len=1024, max_crops=6, max_image_tokens=1200, max_frames=12, max_video_tokens=972),)


def pipeline_config(root, **changes) -> PipelineConfig:
    base = PipelineConfig(processor_dir=str(root / "tokenizer"), sources=(Source(str(dataset_dir(root))),),
                          batch_size=2, buckets=BUCKETS, seed=1, lookahead=6, process_index=0, process_count=1)
    return dataclasses.replace(base, **changes)


def _names(config) -> list[str]:
    return [ex["name"] for ex in examples(config)]


def test_restore_mid_epoch_gives_the_identical_next_batch(synthetic_root):
    config = pipeline_config(synthetic_root)
    it = iter(dataset(config))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON
    expected = [next(it) for _ in range(2)]
    resumed = iter(dataset(config))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert fill_stats(expected[0])["examples"] >= 2


def test_hosts_see_disjoint_shards_that_cover_the_data(synthetic_root):
    one_epoch = pipeline_config(synthetic_root, num_epochs=1)
    everything = _names(one_epoch)
    assert len(everything) == len(set(everything)) == 24
    shards = [set(_names(dataclasses.replace(one_epoch, process_index=i, process_count=2))) for i in range(2)]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(everything)


def test_mixture_rates_hold_over_many_draws(tmp_path, synthetic_root):
    manifests = [write_manifest(tmp_path / f"m{k}.jsonl", [qa(i) for i in range(300 + k)]) for k in range(3)]
    sources = tuple(Source(str(m), weight=w) for m, w in zip(manifests, (0.7, 0.2, 0.1)))
    counts = mixture_counts(pipeline_config(synthetic_root, sources=sources), 5000)
    np.testing.assert_allclose(counts / counts.sum(), [0.7, 0.2, 0.1], atol=0.01)
    # each source is still shuffled and repeated, not replayed in file order
    mixed = records(pipeline_config(synthetic_root, sources=sources))
    lines = [mixed[i][1]["line"] for i in range(3000) if mixed[i][0] == 1]
    assert sorted(set(lines[:301])) == list(range(1, 302)) and lines[:301] != sorted(lines[:301])


def bad_manifest(tmp_path, n_good: int):
    media = write_media(tmp_path)
    lines = [qa(i, image=str(media["image"])) for i in range(n_good)]
    lines += [qa(100, image=str(tmp_path / "missing.png")), qa(101, video=str(media["corrupt"])),
              {"id": "pt", "image": str(media["image"]), "messages": [
                  {"role": "user", "content": "Point."}, {"role": "assistant", "points": [{"x": 1}]}]}]
    return write_manifest(tmp_path / "mixed.jsonl", lines)


def test_bad_examples_are_skipped_with_a_warning_and_counted(tmp_path, synthetic_root, caplog):
    manifest = bad_manifest(tmp_path, 12)
    config = pipeline_config(synthetic_root, sources=(Source(str(manifest)),), num_epochs=1, max_bad_fraction=0.3)
    it = iter(examples(config))
    with caplog.at_level(logging.WARNING, logger="molmo2_jax.data.pipeline"):
        names = [ex["name"] for ex in it]
    assert len(names) == 12
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "missing.png" in warnings and "corrupt.mp4" in warnings and "(pt): messages[1].points[0]" in warnings
    assert it.get_state()["bad"] == 3 and it.get_state()["seen"] == 15


def test_too_many_bad_examples_fail_with_a_clear_message(tmp_path, synthetic_root):
    manifest = bad_manifest(tmp_path, 4)
    config = pipeline_config(synthetic_root, sources=(Source(str(manifest)),), num_epochs=1, max_bad_fraction=0.1)
    with pytest.raises(TooManyBadExamplesError, match=r"3 of 7 examples were bad, more than max_bad_fraction=0.1"):
        list(examples(config))


def test_bad_settings_are_named(tmp_path, synthetic_root):
    with pytest.raises(DataError, match="manifest not found: .*nope.jsonl"):
        records(pipeline_config(synthetic_root, sources=(Source(str(tmp_path / "nope.jsonl")),)))
    with pytest.raises(DataError, match="not a TFDS dataset directory"):
        records(pipeline_config(synthetic_root, sources=(Source(str(tmp_path)),)))
    with pytest.raises(DataError, match="no split 'test'"):
        records(pipeline_config(synthetic_root, sources=(Source(str(dataset_dir(synthetic_root)), split="test"),)))


def test_worker_processes_give_the_same_examples(synthetic_root):
    config = pipeline_config(synthetic_root, num_epochs=1, shuffle=False)
    assert _names(dataclasses.replace(config, num_workers=2)) == _names(config)


def test_restore_with_a_worker_process(synthetic_root):
    config = pipeline_config(synthetic_root, num_workers=1)
    it = iter(dataset(config))
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    resumed = iter(dataset(config))
    resumed.set_state(state)
    got = next(resumed)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    it.close()
    resumed.close()


def test_workers_ignore_a_ctrl_c_sent_to_the_process_group(synthetic_root):
    """A terminal's Ctrl-C (or a scheduler's SIGTERM) reaches the workers too; they leave it to the training loop,
    which saves its step before stopping, instead of dying with a KeyboardInterrupt traceback."""
    import multiprocessing
    import os
    import signal

    config = pipeline_config(synthetic_root, num_workers=1, num_epochs=1, shuffle=False)
    it = iter(examples(config))
    names = [next(it)["name"]]
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGTERM)
    names += [ex["name"] for ex in it]  # a worker killed by the signal would end this with an error
    assert names == _names(dataclasses.replace(config, num_workers=0))
    it.close()
