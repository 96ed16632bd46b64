#!/usr/bin/env bash
# 4 processes with USP: Ulysses 2 (all-to-all over heads) x ring 2 (ring attention over the sequence).
# NCCL on 4 GPUs; without GPUs the same command runs on the CPU with gloo (slowly, but it runs).
# A dead or hung rank stops every process: collectives give up after --dist-timeout seconds.
set -euo pipefail

MODEL=${MODEL:-models/ltx-tiny}
HEIGHT=${HEIGHT:-64} WIDTH=${WIDTH:-96} FRAMES=${FRAMES:-9} STEPS=${STEPS:-4}
OUT=${OUT:-outputs/examples}

torchrun --nproc_per_node 4 -m usp_infer generate --model "$MODEL" \
    --prompt "a red fox running through fresh snow" \
    --height "$HEIGHT" --width "$WIDTH" --num-frames "$FRAMES" --steps "$STEPS" --seed 42 \
    --ulysses-degree 2 --ring-degree 2 --dist-timeout 120 \
    --output "$OUT/fox_usp4.mp4" --overwrite

# Which layouts fit 4 processes for this checkpoint (Ulysses must divide the attention heads):
usp-infer info "$MODEL" --gpus 4 | tail -n 4
