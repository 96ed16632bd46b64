#!/usr/bin/env bash
# A batch from a JSON Lines file: the model loads once, each line may override any generate option.
# Items without "output" go to $OUT/<index>-<prompt slug>-s<seed>.mp4, each with a .json sidecar.
# If the run is interrupted (Ctrl-C, kill -9, a lost node), run the same command again with --resume:
# finished items are skipped untouched, the rest are made. --keep-going moves past a failed item
# (the exit code is still 1 at the end).
set -euo pipefail

MODEL=${MODEL:-models/ltx-tiny}
PROMPTS=${PROMPTS:-examples/prompts.jsonl}
HEIGHT=${HEIGHT:-64} WIDTH=${WIDTH:-96} FRAMES=${FRAMES:-9} STEPS=${STEPS:-4}
OUT=${OUT:-outputs/examples/batch}

run() {
    usp-infer batch "$PROMPTS" --model "$MODEL" --output-dir "$OUT" \
        --height "$HEIGHT" --width "$WIDTH" --num-frames "$FRAMES" --steps "$STEPS" \
        --resume --keep-going "$@"
}

run    # makes every item: "done: 4 ran, 0 skipped, 0 failed"
run    # finds them all finished and loads nothing: "done: 0 ran, 4 skipped, 0 failed"
ls "$OUT"
