"""The official Molmo2 grounding metrics: our scorers against allenai/molmo2's on the sets of
tests/eval_fixtures.py (released schemas, hand-made answers).

The expected numbers are the official scorers' output on these sets, obtained by running
allenai/molmo2 (HEAD f3cb108) `olmo/eval/evaluators.py` (PointingEval, PointBenchEval, PointCountEval,
VixMoPointCountEval, VixMoPointEval, VideoObjectTrackingEval) and `object_tracking_utils.py`, with the
rows turned into metadata by its own loaders (PixMoPointsEval, PointBench, Molmo2VideoCountEval,
Molmo2VideoPointEval, Molmo2VideoTrackEval at 1 fps), CUDA / torch.distributed replaced by one CPU
process. The official means go through torchmetrics in float32, ours are float64: hence abs=1e-6.
"""

import json

import eval_fixtures as F
import numpy as np
import pytest
from PIL import Image

from molmo2_jax.evaluation import answers, metrics
from molmo2_jax.evaluation.datasets import read_examples

approx = lambda v: pytest.approx(v, abs=1e-6)


def _examples(task, rows, tmp_path, media=None):
    path = tmp_path / f"{task}.json"
    path.write_text(json.dumps(rows))
    examples, skipped = read_examples(task, path, media, log=None)
    assert skipped == []
    return [e.truth for e in examples]


def test_image_pointing_matches_the_official_scorer(tmp_path):
    rows, texts = F.pointing_set()
    truths = _examples("pointing", rows, tmp_path)
    # official PointingEval, one example at a time: hits, hit + miss, miss, no truth / no prediction,
    # no truth / a point, an extra point, malformed, Molmo v1 <point x y>, reversed order, a second
    # image group (read with the one image's size), a point outside the image
    official_f1 = [1, 0.5, 0, 1, 0, 0.8, 0, 1, 1, 1, 0]
    assert [metrics.pointing_example(t, a)[2] for t, a in zip(truths, texts)] == [approx(v) for v in official_f1]
    assert metrics.pointing_example(truths[5], texts[5])[:2] == (approx(2 / 3), 1.0)
    assert metrics.score_pointing(truths, texts) == {
        "precision": approx(0.560606062412262), "recall": approx(0.5909090638160706), "f1": approx(0.5727272629737854)}


def test_point_bench_matches_the_official_scorer(tmp_path):
    rows, masks, texts = F.point_bench_set()
    for row, mask in zip(rows, masks):
        for sub, name, image in (("selected_images", row["image_filename"], np.zeros((F.H, F.W, 3), np.uint8)),
                                 ("selected_masks", row["mask_filename"], mask.astype(np.uint8) * 255)):
            (tmp_path / sub / row["category"]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / sub / row["category"] / name)
    truths = _examples("point_bench", rows, tmp_path, media=tmp_path)
    official = {"affordable": 1.0, "counting": 0.0, "reasoning": 0.0, "spatial": 1.0, "steerable": 0.5}
    # the headline, which the official evaluator leaves to the reader, is the mean of the five
    assert metrics.score_point_bench(truths, texts) == {"accuracy": approx(0.5), **official}


def test_image_counting_counts_points_like_the_official_scorer(tmp_path):
    rows, texts = F.count_set()
    counts = _examples("count", rows, tmp_path)
    assert [answers.point_count(t) for t in texts] == [3, 3, 0, 0, 2, 0, 3]
    assert metrics.score_count(counts, texts) == {
        "correct": approx(0.5714285969734192), "close": approx(0.8571428656578064), "valid": 1.0,
        "correct_0": 1.0, "correct_1": 0.0, "correct_2": 1.0, "correct_3": 1.0, "correct_4": 0.0, "correct_5": 0.0}


def test_video_counting_reads_the_stated_number_like_the_official_scorer(tmp_path):
    rows, texts = F.video_count_set()
    truths = _examples("video_count", rows, tmp_path)
    # "There are none." and "There are 4 cats." are not read (invalid), as officially
    assert [answers.stated_count(t) for t in texts] == [3, 7, None, 26, 43, None, None, 12]
    result = metrics.score_video_count([c for c, _ in truths], [k for _, k in truths], texts)
    assert result == {
        "correct": 0.25, "close": 0.625, "valid": 0.625,
        "correct_0_5": 0.25, "correct_5_10": 0.0, "correct_10_15": 1.0,
        "correct_15_20": None, "correct_20_25": None,  # NaN (an empty mean) in the official output
        "correct_25_41": 0.0, "acc_object": 0.5, "acc_animal": 0.0, "acc_action/event": 0.0}


def test_video_pointing_matches_the_official_scorer(tmp_path):
    rows, texts = F.video_pointing_set()
    truths = _examples("video_pointing", rows, tmp_path)
    # all hit; 0.7 s (between 2-fps frames) misses; an extra point; wrong place; no truth / nothing;
    # no truth / a point; the older <points t i x y /> form; malformed; points out of time order
    official = [(1, 1, 1), (0.5, 1 / 3, 0.4), (0.75, 1, 0.8571428657), (0, 0, 0), (1, 1, 1), (0, 0, 0),
                (1, 1, 1), (0, 0, 0), (1, 2 / 3, 0.8)]
    assert [metrics.video_pointing_example(t, a) for t, a in zip(truths, texts)] == [
        tuple(approx(v) for v in e) for e in official]
    assert metrics.score_video_pointing(truths, texts) == {
        "precision": approx(0.5833333134651184), "recall": approx(0.5555555820465088),
        "f1": approx(0.561904788017273), "valid": approx(0.7777777910232544)}


def test_tracking_matches_the_official_scorer(tmp_path):
    rows, texts = F.tracking_set()
    truths = _examples("tracking", rows, tmp_path)
    # official evaluate_video_object_tracking per example: (precision, recall, f1, HOTA, DetA, AssA)
    official = [
        (0.6666666666666666, 0.5, 0.555555555524074, 0.6831300510639732, 0.6, 0.7777777777777778),
        (0.6666666666666666, 0.5, 0.555555555524074, 0.4472135954999579, 0.6, 0.3333333333333333),  # ids switch
        (0.5, 0.375, 0.4166666666430555, 0.6055300708194983, 0.6, 0.611111111111111),  # between frames
        (0, 0, 0, 0, 0, 0),  # no prediction
        (0.5, 0.5, 0.49999999996666666, 0.6123724356957945, 0.5, 0.75),  # an extra point
        (0.6666666666666666, 0.5, 0.555555555524074, 0.7905694150420949, 0.75, 0.8333333333333334),  # older form
        (0.6666666666666666, 0.3333333333333333, 0.4444444444148148, 0.7071067811865476, 0.5, 1.0),  # id twice
        (1, 1, 1, 1, 1, 1),  # no truth, no prediction
        (0, 0, 0, 0, 0, 0),  # no truth, a prediction
    ]
    keys = ("precision", "recall", "f1", "hota", "deta", "assa")
    for n, (truth, text, expected) in enumerate(zip(truths, texts, official)):
        got = metrics.tracking_example(truth, text)
        assert [got[k] for k in keys] == [approx(v) for v in expected], n
    result = metrics.score_tracking(truths, texts)
    assert {k: result[k] for k in keys} == {
        "precision": approx(0.5185185074806213), "recall": approx(0.41203704476356506),
        "f1": approx(0.4475308656692505), "hota": approx(0.5384358167648315),
        "deta": approx(0.5055555701255798), "assa": approx(0.5895061492919922)}


def test_masks_read_compressed_and_uncompressed_rle_alike():
    from molmo2_jax.evaluation.masks import decode_rle

    assert np.array_equal(decode_rle(F.rle(F.B)), F.B)
    assert np.array_equal(decode_rle(F.rle(F.B, compressed=False)), F.B)
