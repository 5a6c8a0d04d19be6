#!/usr/bin/env bash
# The main job on built-in data: build the synthetic grounding set, train the tiny model on it (CPU, 9 to
# 14 minutes on 2 cores), then score pointing, counting and tracking on the held-out split with the official
# metrics, for the untrained model and the steps saved every 400, and plot and draw them (runs/tiny/eval/:
# metrics.json, metrics.png, examples.png, track.gif). Outputs go to data/ and runs/; a second run keeps the
# data if it was built with these settings and resumes the training run if it was started with this
# molmo2_jax/configs/train/tiny.yaml (else both start afresh).
set -euo pipefail
cd "$(dirname "$0")/.."
cli=.venv/bin/molmo2-jax
tiny=molmo2_jax/configs/train/tiny.yaml
settings=data/synthetic/build_settings.json
built_before=$(cat "$settings" 2>/dev/null || true)
$cli build-synthetic --out data/synthetic --reuse --overwrite --crop-size 224 --image-size 224 \
    --object-size 32 48 --max-count 4 --max-distractors 2 --num-train 8000 \
    --tasks '{"point": 0.4, "count": 0.35, "caption": 0.05, "qa": 0.05, "track": 0.1, "video_count": 0.05}'
# A run trained on other data (its tokenizer is gone) or with another tiny.yaml cannot be resumed: start afresh.
if [ -d runs/tiny ] && { [ "$built_before" != "$(cat "$settings")" ] ||
                         ! cmp -s $tiny runs/tiny/tiny.yaml; }; then
  rm -rf runs/tiny.old && mv runs/tiny runs/tiny.old
  echo "runs/tiny was trained on other data or with another $tiny; it is now runs/tiny.old"
fi
mkdir -p runs/tiny && cp $tiny runs/tiny/tiny.yaml
# Saves every 400 steps, all kept: the held-out evaluation scores each of them.
$cli train --config $tiny checkpoint.every=400 checkpoint.keep=10 "$@"
$cli eval-synthetic --run runs/tiny --data data/synthetic --out runs/tiny/eval
