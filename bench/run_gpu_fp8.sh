#!/usr/bin/env bash
# FP8 (issue 25) on one H200 (nvidia-h200), from the repository root, in one device call (limits sum to
# 590 s); torch alone, no diffusers:
#
#   OUT=dir bash bench/run_gpu_fp8.sh
#
# 0. tests/test_gpu.py -k fp8: the kernel's bits and NaN on CUDA, a tiny fp8 forward eager and compiled (~30 s)
# 1. bench/fp8_gpu.py micro: the Triton activation quantization vs torch ops (and its bits vs torch's);
#    FP8Linear vs bf16 linear at LTX-2.3's shapes, 24,576 rows                                     (~40 s)
# 2. usp-infer bench --quantize fp8,fp8-static --compile: bf16, fp8 and fp8-static rows of one launch each:
#    LTX-2.3 22B at 768x512x121 (6,144 tokens, 4 branches)                                          (~150 s)
#    LTX-Video 13B at 768x512x121 (3 branches)                                                      (~100 s)
#    LTX-2.3 22B at 1536x1024x121 (24,576 tokens, 1 branch)                                        (~120 s)
# 3. bench/fp8_gpu.py errors: relative L2 vs bf16 of one forward and a 30-step trajectory, weight memory (~70 s)
#
# Every step writes JSON and a log under $OUT as it finishes, so a call cut short keeps what it measured.
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
S6="--height 512 --width 768 --num-frames 121"     # 6,144 video tokens
S24="--height 1024 --width 1536 --num-frames 121"  # 24,576 video tokens

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?; echo "$(date +%T) $name: exit $rc"
  tail -n 8 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
step gpu-tests 35 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k fp8
step micro 75 python3 bench/fp8_gpu.py micro "$OUT/fp8-micro.json"
step ltx23-6144 185 python3 -m usp_infer bench --shape ltx-2.3-22b $S6 --warmup 1 --steps 3 --compile \
  --quantize fp8,fp8-static --json-out "$OUT/fp8-ltx23-6144.json"
step ltxv13b-6144 100 python3 -m usp_infer bench --shape ltx-video-13b $S6 --warmup 1 --steps 3 --compile \
  --quantize fp8,fp8-static --json-out "$OUT/fp8-ltxv13b-6144.json"
step ltx23-24576 115 python3 -m usp_infer bench --shape ltx-2.3-22b $S24 --branches 1 --warmup 1 --steps 2 \
  --compile --quantize fp8 --json-out "$OUT/fp8-ltx23-24576.json"
step errors 80 python3 bench/fp8_gpu.py errors "$OUT/fp8-errors.json"
