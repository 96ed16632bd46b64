#!/usr/bin/env bash
# One rank's share of the 2026-11-28 multi-GPU LTX-Video 13B launches, timed on one GPU with the code those
# launches ran (8c0ba2b), for the cost model's validation (python bench/validate_costmodel.py --rank-share DIR):
#
#   git archive 8c0ba2b usp_infer | tar -x -C outputs/old    # once, here (outputs/ is ignored)
#   OUT=dir bash bench/run_gpu_rank_share.sh                   # one device call, carrying outputs/old
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
OLD=${OLD:-outputs/old}
S6="--shape ltx-video-13b --height 512 --width 768 --num-frames 121"
S27="--shape ltx-video-13b --height 704 --width 1216 --num-frames 257"  # 27,588 tokens
share() {  # share NAME SECONDS WORLD BENCH-ARGS...
  local name=$1 limit=$2 world=$3; shift 3
  timeout -k 10 "$limit" python3 bench/rank_share.py "$OLD" --world "$world" -- "$@" --json-out "$OUT/$name.json" \
    >"$OUT/$name.log" 2>&1
  rc=$?; echo "$(date +%T) $name: exit $rc"; tail -n 8 "$OUT/$name.log"
}
share rs-w4-6144 120 4 $S6 --layouts 1x1x4,1x2x2,2x1x2,1x4x1 --a2a-mode both --warmup 2 --steps 5
share rs-w2-6144 90 2 $S6 --layouts 1x1x2 --a2a-mode both --warmup 2 --steps 5
share rs-w4-27588 120 4 $S27 --layouts 1x1x4 --a2a-mode both --warmup 1 --steps 3
share rs-w4-6144-compiled 200 4 $S6 --layouts 1x1x4,1x2x2 --compile --warmup 2 --steps 5
