#!/usr/bin/env bash
# One video on one GPU (or the CPU): text to video, then the same seed again as .npz (frames + latents).
# Runs as is from the repository root against the embedded tiny model; for a real checkpoint set
# MODEL=models/ltx-video HEIGHT=480 WIDTH=704 FRAMES=121 STEPS=40 (see `usp-infer info $MODEL`).
set -euo pipefail

MODEL=${MODEL:-models/ltx-tiny}
HEIGHT=${HEIGHT:-64} WIDTH=${WIDTH:-96} FRAMES=${FRAMES:-9} STEPS=${STEPS:-4}
OUT=${OUT:-outputs/examples}

usp-infer generate --model "$MODEL" \
    --prompt "a red fox running through fresh snow" --negative-prompt "blurry, low quality" \
    --height "$HEIGHT" --width "$WIDTH" --num-frames "$FRAMES" --steps "$STEPS" --seed 42 \
    --guidance-scale 3 --output "$OUT/fox.mp4" --overwrite

# --json prints a machine-readable summary on stdout (timings, layout, versions); progress stays on stderr.
usp-infer generate --model "$MODEL" \
    --prompt "a red fox running through fresh snow" --negative-prompt "blurry, low quality" \
    --height "$HEIGHT" --width "$WIDTH" --num-frames "$FRAMES" --steps "$STEPS" --seed 42 \
    --guidance-scale 3 --output "$OUT/fox.npz" --overwrite --quiet --json > "$OUT/fox.summary.json"

echo "video: $OUT/fox.mp4 (settings in $OUT/fox.mp4.json); summary: $OUT/fox.summary.json"
