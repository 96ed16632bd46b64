#!/usr/bin/env bash
# Image to video: the image conditions the first frame (cover-resized and center-cropped to the size).
# Runs as is from the repository root against the embedded tiny model and the test image.
set -euo pipefail

MODEL=${MODEL:-models/ltx-tiny}
IMAGE=${IMAGE:-tests/data/first_frame.png}
HEIGHT=${HEIGHT:-64} WIDTH=${WIDTH:-96} FRAMES=${FRAMES:-9} STEPS=${STEPS:-4}
OUT=${OUT:-outputs/examples}

usp-infer generate --model "$MODEL" --image "$IMAGE" --image-strength 1.0 \
    --prompt "the scene comes alive, gentle camera motion" \
    --height "$HEIGHT" --width "$WIDTH" --num-frames "$FRAMES" --steps "$STEPS" --seed 7 \
    --guidance-scale 3 --stg-scale 1 --stg-blocks 1 --guidance-rescale 0.7 \
    --output "$OUT/i2v.mp4" --overwrite

echo "video: $OUT/i2v.mp4"
