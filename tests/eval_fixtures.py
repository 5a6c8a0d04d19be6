"""Small evaluation sets in the released schemas with hand-made answers, for the metric tests.

Each `*_set()` returns (rows, answers): rows as the hub's files hold them, answers as a model (or a
person imitating one) might write them: hits, misses, extra points, no truth with no prediction,
malformed answers, older formats, timestamps between frames and tracks whose ids switch. The
expected numbers in tests/test_evaluation_metrics.py are the official scorers' output on these sets.
"""

from __future__ import annotations

import numpy as np

W, H = 40, 30  # image / frame size of every fixture


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """[H, W] bool mask, True on columns x0..x1 and rows y0..y1 (inclusive)."""
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """COCO RLE of a mask as the hub stores it: compressed counts as a string, or a list of runs."""
    from pycocotools import mask as coco

    if compressed:
        encoded = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [H, W], "counts": encoded["counts"].decode()}
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [H, W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


A, B = box(4, 3, 11, 8), box(24, 15, 33, 24)  # two objects; (8, 6) is in A, (28, 19.5) in B


def pointing_set():
    """pixmo-points-eval rows: points on a 0..100 scale, one mask per point."""
    two = {"points": [{"x": 20.0, "y": 20.0}, {"x": 70.0, "y": 65.0}], "masks": [A.tolist(), B.tolist()],
           "label": "thing", "image_url": "http://example/1.jpg"}
    one = {"points": [{"x": 20.0, "y": 20.0}], "masks": [A.tolist()], "label": "thing",
           "image_url": "http://example/2.jpg"}
    nothing = {"points": [], "masks": [], "label": "unicorn", "image_url": "http://example/3.jpg"}
    rows_answers = [
        (two, 'Counting the <points coords="1 1 200 200 2 700 650">thing</points> shows a total of 2.'),  # both hit
        (two, '<points coords="1 1 200 200 2 950 950">thing</points>'),  # a hit and a miss
        (one, '<points coords="1 1 900 100">thing</points>'),  # a miss
        (nothing, "There are none."),  # no truth, no prediction
        (nothing, '<points coords="1 1 500 500">unicorn</points>'),  # no truth, a prediction
        (two, '<points coords="1 1 200 200 2 700 650 3 500 100">thing</points>'),  # an extra point
        (one, '<points coords="1 1 2x0 300">thing</points'),  # malformed
        (one, '<point x="20.0" y="20.0" alt="thing">thing</point>'),  # Molmo v1 format
        (two, '<points coords="1 1 700 650 2 200 200">thing</points>'),  # listed in the other order
        (two, '<points coords="1 1 200 200;2 2 700 650">thing</points>'),  # a second image group
        (one, '<points alt="thing" coords="1 1 1000 1100">thing</points>'),  # a point outside the image
    ]
    return [r for r, _ in rows_answers], [a for _, a in rows_answers]


def point_bench_set():
    """PointArena data.json rows, with their (image size, mask) to write under selected_*/<category>/."""
    rows_answers = [
        ("affordable", A, '<points coords="1 1 200 200">a</points>'),  # in
        ("affordable", A, '<points coords="1 1 200 200 2 250 250">a</points>'),  # both in
        ("counting", A, '<points coords="1 1 200 200 2 700 650">a</points>'),  # one out
        ("reasoning", B, "I cannot tell."),  # no point
        ("spatial", B, '<points coords="1 1 700 650">a</points>'),  # in
        ("steerable", B, '<points coords="1 1 599 500">a</points>'),  # x 23.96 truncates to 23: out
        ("steerable", B, '<points coords="1 1 600 500">a</points>'),  # x 24: in
    ]
    rows = [{"category": c, "image_filename": f"{n}.png", "mask_filename": f"{n}_mask.png",
             "user_input": "Point to it."} for n, (c, _, _) in enumerate(rows_answers)]
    return rows, [m for _, m, _ in rows_answers], [a for _, _, a in rows_answers]


def count_set():
    """pixmo-count / CountBench rows: the true count."""
    rows_answers = [
        (3, 'Counting the <points coords="1 1 100 100 2 200 200 3 300 300">dog</points> shows a total of 3.'),
        (4, 'Counting the <points coords="1 1 100 100 2 200 200 3 300 300">dog</points> shows a total of 3.'),
        (0, "There are none."),
        (5, "There are 5 dogs."),  # a stated number without points counts 0
        (2, '<points x1="10.0" y1="10.0" x2="20.0" y2="20.0" alt="dog">dog</points>'),  # Molmo v1
        (1, "<points coords=garbage"),
        (3, 'There are 3 <points coords="1 1 100 100 2 200 200 3 300 300">dog</points>.'),
    ]
    return [{"count": c, "label": "dog"} for c, _ in rows_answers], [a for _, a in rows_answers]


def video_count_set():
    """Molmo2-VideoCountEval rows: the true count and the category."""
    rows_answers = [
        (3, "object", "3"),
        (8, "animal", 'Counting the <points coords="0.5 1 100 100">a</points> shows a total of 7.'),
        (0, "object", "There are none."),  # not read as 0 by the official scorer
        (25, "action/event", "a total of 26"),
        (40, "animal", "Counting shows a total of 43."),
        (2, "object", '<points coords="0.5 1 1'),  # malformed
        (4, "action/event", "There are 4 cats."),  # not a form the official scorer reads
        (12, "object", "The total number of cats is: 12."),
    ]
    rows = [{"video_id": f"v{n}", "video_source": "youtube", "clip_start": 0.0, "clip_end": 10.0, "count": c,
             "label": "cat", "question": "How many cats?", "category": cat, "video_duration": 10.0}
            for n, (c, cat, _) in enumerate(rows_answers)]
    return rows, [a for _, _, a in rows_answers]


def video_pointing_set():
    """Molmo2-VideoPointEval rows: pixel points at 2-fps timestamps, each with its masks by frame_id."""
    def row(times_points_masks, duration=4.0):
        return {"video_id": "v", "video_source": "youtube", "label": "ball", "width": W, "height": H,
                "video_duration": duration, "two_fps_timestamps": [t for t, _, _ in times_points_masks],
                "points": [{"x": x, "y": y} for _, (x, y), _ in times_points_masks],
                "masks": [[{"frame_id": int(t * 2), "rle": rle(m, compressed=n % 2 == 0)}]
                          for n, (t, _, m) in enumerate(times_points_masks)]}

    three = row([(0.5, (8.0, 6.0), A), (1.0, (28.0, 19.5), B), (2.5, (8.0, 6.0), A)])
    one = row([(1.5, (28.0, 19.5), B)])
    nothing = row([])
    rows_answers = [
        (three, '<points coords="0.5 1 200 200;1.0 2 700 650;2.5 3 200 200">ball</points>'),  # all hit
        (three, '<points coords="0.7 1 200 200;1.0 2 700 650">ball</points>'),  # 0.7 s is between frames
        (three, '<points coords="0.5 1 200 200;1.0 2 700 650;2.5 3 200 200;3.0 4 500 500">ball</points>'),
        (one, '<points coords="1.5 1 200 200">ball</points>'),  # right time, wrong place
        (nothing, "There are none."),
        (nothing, '<points coords="1.0 1 500 500">ball</points>'),
        (one, "<points 1.5 1 70.0 65.0 />"),  # the older 0..100 form
        (one, "<points coords=\"1.5 1 70"),  # malformed
        (three, '<points coords="2.5 1 200 200;0.5 2 200 200">ball</points>'),  # out of order
    ]
    return [r for r, _ in rows_answers], [a for _, a in rows_answers]


def tracking_set():
    """Molmo2-VideoTrackEval rows at 2 fps (scored at 1 fps: frames 0, 2, 4): per-object points and
    masks by frame. Object "7" is in frames 0-3 and 5, object "9" in frames 2-5."""
    masks7 = [A, A, A, A, None, A]
    masks9 = [None, None, B, B, B, B]
    points7 = [[8.0, 6.0] if m is not None else None for m in masks7]
    points9 = [[28.0, 19.5] if m is not None else None for m in masks9]
    row = {"id": "track-0", "video": "vid", "clip": "clip0", "video_dataset": "sportsmot", "fps": 2,
           "start_frame": 0, "end_frame": 5, "exp": "the players", "w": W, "h": H, "mask_id": ["7", "9"],
           "points": [{"object_id": "7", "points": points7}, {"object_id": "9", "points": points9}],
           "masks": [{"object_id": "7", "masks": [rle(m) if m is not None else None for m in masks7]},
                     {"object_id": "9", "masks": [rle(m, compressed=False) if m is not None else None
                                                  for m in masks9]}]}
    empty = dict(row, id="track-empty", video_dataset="sav", mask_id=["1"],
                 points=[{"object_id": "1", "points": [None] * 6}],
                 masks=[{"object_id": "1", "masks": [None] * 6}])
    good = '<tracks coords="0.0 1 200 200;1.0 1 200 200 2 700 650;2.0 2 700 650">players</tracks>'
    rows_answers = [
        (row, good),
        (row, '<tracks coords="0.0 1 200 200;1.0 2 200 200 1 700 650;2.0 1 700 650">players</tracks>'),  # ids switch
        # between frames
        (row, '<tracks coords="0.0 1 200 200;0.7 1 200 200;1.2 1 200 200 2 700 650">players</tracks>'),
        (row, "No tracks available."),
        (row, '<tracks coords="0.0 1 200 200 2 900 900;1.0 1 200 200 2 700 650;2.0 2 700 650">players</tracks>'),
        (row, "time 0.00\n{0: [20.0, 20.0]}\ntime 1.00\n{0: [20.0, 20.0], 1: [70.0, 65.0]}"),  # older format
        (row, '<tracks coords="0.0 1 200 200;1.0 1 200 200 1 700 650">players</tracks>'),  # an id twice in a frame
        (empty, "No tracks available."),
        (empty, '<tracks coords="0.0 1 200 200">players</tracks>'),
    ]
    return [dict(r, id=f"{r['id']}-{n}") for n, (r, _) in enumerate(rows_answers)], [a for _, a in rows_answers]


def write_lossless_mp4(path, frames: np.ndarray, fps: int = 2):
    """An MP4 holding exactly `frames` `[n, H, W, 3]` uint8 (lossless H.264 in 4:4:4), so a clip of it and a file
    cut from it decode to the same pixels."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
