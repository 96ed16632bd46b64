#!/usr/bin/env bash
# LTX-2 on one H200 (nvidia-h200), from the repository root; each set fits one device call (< 10 min):
#
#   OUT=dir bash bench/run_gpu_ltx2.sh one     # LTX-2.3 22B at 768x512x121: eager, compiled, diffusers x2;
#                                              # image-to-video steps; LTX-2.0 19B eager + diffusers
#   OUT=dir bash bench/run_gpu_ltx2.sh big     # LTX-2.3 22B at 1536x1024x121 (24,576 video tokens)
#   OUT=dir bash bench/run_gpu_ltx2.sh ab      # GPU tests; LTX-2.3 6,144 t2v (+ diffusers) and i2v; OLD= the same on older code
#   OUT=dir bash bench/run_gpu_ltx2.sh recipes # whole LTX-2.3 generations by phase, compiled (bench --recipe; needs
#                                              # diffusers and PyAV wheels in .whl/): two-stage distilled at
#                                              # 1536x1024x121, two-stage dev and distilled at 768x512x121 output
#   OUT=dir bash bench/run_gpu_ltx2.sh recipes-1536 # (recipes-768) one half of `recipes`
#   OUT=dir bash bench/run_gpu_ltx2.sh recipes-fp8 # two-stage distilled 1536x1024x121, bf16 then fp8, compiled
#   OUT=dir bash bench/run_gpu_ltx2.sh recipes-768-fp8 # two-stage dev 768x512x121, bf16 then fp8, compiled
#   OUT=dir bash bench/run_gpu_ltx2.sh recipes-fp8-static # two-stage distilled 1536x1024x121: bf16, then fp8 with
#                                              # calibrated static input scales (quantize --calibrate's), compiled
#   OUT=dir bash bench/run_gpu_ltx2.sh dev-fastest # two-stage dev 768x512x121, compiled, plain and --cuda-graphs:
#                                              # bf16, then fp8 with static input scales
#   OUT=dir bash bench/run_gpu_ltx2.sh step-fp8    # the four-branch step at 6,144 tokens: bf16, fp8, fp8 with the
#                                              # Triton row kernel inside compiled blocks, fp8-static
#   OUT=dir bash bench/run_gpu_ltx2.sh step-fp8-big # the one-branch step at 24,576 tokens: bf16, fp8, fp8-static
#   OUT=dir bash bench/run_gpu_ltx2.sh one-branch  # the one-branch step at 6,144 tokens
#   OUT=dir bash bench/run_gpu_ltx2.sh graphs      # GPU tests of --cuda-graphs, then the two-stage dev (768x512x121)
#                                              # and distilled (1536x1024x121) recipes without and with them
#   OUT=dir bash bench/run_gpu_ltx2.sh graphs-steps # every --cuda-graphs GPU test; steps plain and graphed: LTX-2.3 at
#                                              # 4 x 1,536 and 4 x 6,144 tokens, eager and compiled
#   OUT=dir bash bench/run_gpu_ltx2.sh profile-1536 # the two-stage dev recipe's stage-1 step (4 x 1,536 tokens),
#                                              # compiled, with a profile: kernel time against the step's wall time
#   OUT=dir bash bench/run_gpu_ltx2.sh text    # the text phase bench --recipe leaves out: Gemma-3 12B + connectors
#                                              # (bench/text_encoder_gpu.py; the image's transformers), ~1 minute
#   OUT=dir bash bench/run_gpu_ltx2.sh attention-cudnn # cuDNN's fp8 flash attention vs its bf16 SDPA, then LTX-2.3
#                                              # forwards with it (bench/fp8_attention_cudnn.py; the cuDNN frontend's
#                                              # wheels in .whl-attn/: 1.16.0 first, 1.32.0 if that one fails), ~5 minutes
#   OUT=dir bash bench/run_gpu_ltx2.sh ltxv    # LTX-Video 13B at 768x512x121, t2v and i2v, eager and compiled;
#                                              # with OLD=folder holding an older usp_infer/, that one too
#
# diffusers (for the baseline) installs from wheels in .whl/ when the GPU machine lacks it. Every launch writes JSON records and a log; after
# each, everything is packed into $OUT/results.tgz, so a set cut short keeps what it finished.
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
WHAT=${1:?name what to run: one, big or ltxv}
W=/tmp/ltx2-bench  # kept across the sets of one call: every set adds its files, results.tgz holds them all
mkdir -p "$W/prof"
if command -v nvidia-smi >/dev/null; then  # clocks, power and busy share every 200 ms, one log per set
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
    --format=csv -lms 200 >"$W/smi-$WHAT.csv" 2>/dev/null &
  smi=$!
  trap 'kill $smi 2>/dev/null' EXIT
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
S6="--height 512 --width 768 --num-frames 121"     # 6,144 video tokens, 126 audio tokens
S24="--height 1024 --width 1536 --num-frames 121"  # 24,576 video tokens

launch() {  # launch NAME SECONDS CMD...: CMD in $CODE (default: this checkout), cut at SECONDS (or $LIMIT where
  local name=$1 limit=${LIMIT:-$2}; shift 2  # set: a call with less device time left), its log $W/NAME.log
  (cd "${CODE:-.}" && timeout -k 10 "$limit" "$@") >"$W/$name.log" 2>&1
  rc=$?; echo "$(date +%T) $name: exit $rc"
  tail -n 6 "$W/$name.log"
  tar czf "$OUT/results.tgz" -C "$W" .
}

bench() {  # bench NAME SECONDS ARGS...: `usp-infer bench ARGS`, its records in $W/NAME.json
  local name=$1 limit=$2; shift 2
  launch "$name" "$limit" python3 -m usp_infer bench --json-out "$W/$name.json" "$@"
}

case "$WHAT" in
graphs)  # --cuda-graphs: the GPU tests, then plain and graphed block loops in the same launch per recipe
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "cuda_graphs or two_stage" >"$W/gpu-tests-graphs.log" 2>&1
  rc=$?; echo "$(date +%T) gpu tests: exit $rc"; tail -n 3 "$W/gpu-tests-graphs.log"
  bench e2e-768-dev-graphs 230 --shape ltx-2.3-22b $S6 --recipe two-stage --compile --cuda-graphs
  bench e2e-1536-graphs 260 --shape ltx-2.3-22b $S24 --recipe two-stage-distilled --compile --cuda-graphs
  ;;
graphs-steps)
  timeout -k 10 270 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "cuda_graphs or calibrated" \
    >"$W/gpu-tests-graphs-all.log" 2>&1
  rc=$?; echo "$(date +%T) gpu tests: exit $rc"; tail -n 3 "$W/gpu-tests-graphs-all.log"
  bench ltx23-1536x4-graphs 140 --shape ltx-2.3-22b --height 256 --width 384 --num-frames 121 --warmup 2 --steps 10 \
    --compile --cuda-graphs
  bench ltx23-6144-graphs 170 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile --cuda-graphs
  ;;
profile-1536)
  bench ltx23-1536x4-prof 200 --shape ltx-2.3-22b --height 256 --width 384 --num-frames 121 --warmup 2 --steps 10 \
    --compile --profile "$W/prof/ltx23-1536x4"
  ;;
profile)
  bench ltx23-6144-prof 300 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile --profile "$W/prof/ltx23-6144"
  ;;
one)
  bench ltx23-6144 330 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile --baseline diffusers \
    --profile "$W/prof/ltx23-6144"
  bench ltx23-6144-i2v 200 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile --image
  ;;
big)
  bench ltx23-24576 480 --shape ltx-2.3-22b $S24 --warmup 1 --steps 3 --compile --baseline diffusers
  ;;
ltx2-19b)
  bench ltx20-6144 200 --shape ltx-2-19b $S6 --warmup 2 --steps 5 --baseline diffusers
  ;;
i2v)  # image-to-video steps of both families, eager and compiled (their text-to-video twins: sets one, ltxv)
  bench ltx23-6144-i2v 200 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile --image
  bench ltxv13b-6144-i2v 150 --shape ltx-video-13b $S6 --warmup 2 --steps 5 --compile --image
  ;;
ab)  # GPU tests, then LTX-2.3 at 6,144 tokens on this checkout (with diffusers) and, with OLD=folder, on that one
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$W/gpu-tests.log" 2>&1
  rc=$?; echo "$(date +%T) gpu tests: exit $rc"; tail -n 3 "$W/gpu-tests.log"
  bench ltx23-6144 300 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile --baseline diffusers
  bench ltx23-6144-i2v 200 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile --image
  if [ -n "${OLD:-}" ]; then
    CODE=$OLD bench ltx23-6144-old 200 --shape ltx-2.3-22b $S6 --warmup 2 --steps 5 --compile
  fi
  ;;
recipes)  # issue 23's targets: <= 12 s (two-stage distilled, 1536x1024x121), <= 10 s (two-stage dev, 768x512x121),
  # compiled (eager LTX-2 steps below ~6k tokens are bound by the CPU's kernel launches)
  bench e2e-1536 330 --shape ltx-2.3-22b $S24 --recipe two-stage-distilled --compile
  bench e2e-768 250 --shape ltx-2.3-22b $S6 --recipe two-stage,distilled --compile
  ;;
recipes-1536)  # the 1536x1024x121 half of `recipes`
  bench e2e-1536 330 --shape ltx-2.3-22b $S24 --recipe two-stage-distilled --compile
  ;;
recipes-768-dev)  # the two-stage dev recipe alone at 768x512x121 output (issue 23's <= 10 s)
  bench e2e-768-dev 250 --shape ltx-2.3-22b $S6 --recipe two-stage --compile
  ;;
recipes-768)  # the 768x512x121 half of `recipes`
  bench e2e-768 250 --shape ltx-2.3-22b $S6 --recipe two-stage,distilled --compile
  ;;
recipes-fp8)  # issue 25's: <= 8 s two-stage distilled in fp8 (bf16 and fp8 rows from the same launch and weights)
  bench e2e-1536-fp8 540 --shape ltx-2.3-22b $S24 --recipe two-stage-distilled --compile --quantize fp8
  ;;
recipes-fp8-static)  # issue 25's <= 8 s with static input scales (per-row fp8: recipes-fp8), one launch and weights
  bench e2e-1536-fp8-static 580 --shape ltx-2.3-22b $S24 --recipe two-stage-distilled --compile --quantize fp8-static
  ;;
dev-fastest)  # issue 23's <= 10 s: the dev recipe with everything that cuts its host-bound stage 1
  bench e2e-768-dev-fastest 560 --shape ltx-2.3-22b $S6 --recipe two-stage --compile --cuda-graphs --quantize fp8-static
  ;;
step-fp8)  # the four-branch step at 6,144 tokens, bf16 / fp8 / fp8-kernel / fp8-static, eager and compiled (<= 900 ms)
  bench ltx23-6144-fp8 320 --shape ltx-2.3-22b $S6 --warmup 1 --steps 4 --compile --quantize fp8,fp8-kernel,fp8-static
  ;;
step-fp8-big)  # the one-branch step at 24,576 tokens, bf16 / fp8 / fp8-static, eager and compiled (issue 25's >= 1.3x)
  bench ltx23-24576-fp8 420 --shape ltx-2.3-22b $S24 --branches 1 --warmup 2 --steps 5 --compile --quantize fp8,fp8-static
  ;;
recipes-768-fp8)  # two-stage dev at 768x512x121 output, bf16 then fp8 (issue 23's <= 10 s)
  bench e2e-768-fp8 420 --shape ltx-2.3-22b $S6 --recipe two-stage --compile --quantize fp8
  ;;
attention-cudnn)  # issue 25's >= 1.3x at 24,576 tokens needs the attention (~45% of that step) faster too
  for fe in 1.16.0 1.32.0; do  # the frontend's Python package, each version in its own folder
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "/tmp/fe-$fe" \
      .whl-attn/nvidia_cudnn_frontend-$fe-*.whl || continue
    PYTHONPATH=/tmp/fe-$fe:$PYTHONPATH launch "attention-cudnn-$fe" 420 python3 bench/fp8_attention_cudnn.py \
      --out "$W/attention-cudnn-$fe.json"
    grep -q '"cudnn-fp8-kernel"' "$W/attention-cudnn-$fe.json" 2>/dev/null && break  # it ran: no second version
  done
  ;;
text)
  launch text 150 python3 bench/text_encoder_gpu.py --json-out "$W/text.json"
  ;;
one-branch)
  bench ltx23-6144-1branch 110 --shape ltx-2.3-22b $S6 --branches 1 --warmup 2 --steps 5 --compile
  ;;
ltxv)
  bench ltxv13b-6144 240 --shape ltx-video-13b $S6 --warmup 2 --steps 5 --compile
  bench ltxv13b-6144-i2v 200 --shape ltx-video-13b $S6 --warmup 2 --steps 5 --compile --image
  if [ -n "${OLD:-}" ]; then  # the same command on the older code, in the same call
    CODE=$OLD bench ltxv13b-6144-old 240 --shape ltx-video-13b $S6 --warmup 2 --steps 5 --compile
  fi
  ;;
*)
  echo "unknown set $WHAT: use graphs, graphs-steps, profile, profile-1536, one, ab, big, i2v, ltx2-19b, recipes, recipes-1536, recipes-768, recipes-768-dev, recipes-fp8, recipes-fp8-static, recipes-768-fp8, dev-fastest, step-fp8, step-fp8-big, one-branch, text, attention-cudnn or ltxv" >&2
  exit 2
  ;;
esac
