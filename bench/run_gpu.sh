#!/usr/bin/env bash
# The GPU benchmark matrix on one 4-GPU machine (nvidia-h200-x4), from the repository root:
#
#   bash bench/run_gpu.sh core      # 1, 2, 4 GPUs: layouts, a2a modes, chunks, diffusers, generation (~6 min)
#   bash bench/run_gpu.sh final     # the 13B set, eager and compiled, with profiles (~6 min)
#   bash bench/run_gpu.sh ulysses   # the Ulysses layouts only, after a change to usp.py (~5 min)
#   bash bench/run_gpu.sh one       # one GPU: GPU tests, generate eager vs --compile, the 13B set (~4 min)
#   CPU_SMOKE=1 OUT=/tmp/o bash bench/run_gpu.sh core   # the same plumbing on CPU with the tiny shape
#
# Jobs that need fewer GPUs run side by side on disjoint GPUs (CUDA_VISIBLE_DEVICES). Every job writes
# JSON (bench records, generation sidecars, microbenchmarks) and a log; after each job everything is
# packed into $OUT/results.tgz, so a run cut short still returns what it finished.
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
WHAT=${1:?name what to run: core, final, ulysses or one}
W=/tmp/usp-bench
rm -rf "$W" && mkdir -p "$W/results" "$W/logs" "$W/gen" "$W/other"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
RUN="python3 -m torch.distributed.run --standalone"

if [ -n "${CPU_SMOKE:-}" ]; then  # tiny shape, gloo: checks flags, files and packing, not speed
  BIG=ltx-tiny SMALL=ltx-tiny DEV="--device cpu --dtype float32" GEN_DEV="--device cpu"
  S6="--height 64 --width 96 --num-frames 17" S27="--height 64 --width 128 --num-frames 25"
  S2B="--height 64 --width 64 --num-frames 9" GEN_SIZE="--height 64 --width 96 --num-frames 17"
else
  BIG=ltx-video-13b SMALL=ltx-video-2b DEV="" GEN_DEV="--device cuda"
  S6="--height 512 --width 768 --num-frames 121"     # 6,144 tokens
  S27="--height 704 --width 1216 --num-frames 257"   # 27,588 tokens
  S2B="--height 320 --width 512 --num-frames 25"     # 640 tokens
  GEN_SIZE="--height 256 --width 384 --num-frames 49"
fi

pack() { tar czf "$OUT/results.tgz.tmp" -C "$W" results gen other logs && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }

# bench NAME GPUS NPROC SECONDS ARGS...: one launch of `usp-infer bench` writing results/NAME.json
bench() {
  local name=$1 gpus=$2 n=$3 limit=$4; shift 4
  CUDA_VISIBLE_DEVICES=$gpus timeout -k 10 "$limit" $RUN --nproc_per_node "$n" -m usp_infer bench \
    --dist-timeout 120 $DEV --json-out "$W/results/$name.json" "$@" >"$W/logs/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) $name: exit $rc"
  pack
}

# generate NAME GPUS NPROC: image-to-video with the tiny random model through every stage, VAE decode included
generate() {
  local name=$1 gpus=$2 n=$3
  CUDA_VISIBLE_DEVICES=$gpus timeout -k 10 300 $RUN --nproc_per_node "$n" -m usp_infer generate $GEN_DEV \
    --prompt "a red fox running through fresh snow" --image tests/data/first_frame.png $GEN_SIZE --steps 8 \
    --guidance-scale 3 --stg-scale 1 --stg-blocks 1 --guidance-rescale 0.7 \
    -o "$W/gen/$name.npz" --json --quiet >"$W/logs/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) $name: exit $rc"
  python3 -c "import numpy as np, sys; z = np.load(sys.argv[1]); print({k: (z[k].shape, float(z[k].min()), float(z[k].max())) for k in z.files})" \
    "$W/gen/$name.npz" >>"$W/logs/$name.log" 2>&1
  rm -f "$W/gen/$name.npz"  # the frames are ~60 MB; the sidecar JSON and the log line above are the evidence
  pack
}

{ nvidia-smi; nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())"; env | grep -E '^(NCCL|TORCH)_' ; } \
  >"$W/logs/env.log" 2>&1

case $WHAT in
core)
  # Lanes on disjoint GPUs run side by side: GPU 0 | GPU 1 | GPUs 2-3, then GPUs 0-1 | GPUs 2-3, then all four.
  (
    [ -z "${CPU_SMOKE:-}" ] && CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/microbench.py --out "$W/other/micro.json" \
      >"$W/logs/micro.log" 2>&1
    bench 13b-6144-w1 0 1 150 --shape $BIG $S6 --warmup 2 --steps 4
    bench 13b-6144-w1-compile 0 1 130 --shape $BIG $S6 --warmup 2 --steps 4 --compile  # best effort here
  ) &
  (
    bench 13b-27588-w1 1 1 150 --shape $BIG $S27 --warmup 1 --steps 2
    bench 2b-640-seq-w1 1 1 90 --shape $SMALL $S2B --branch-mode sequential --warmup 3 --steps 10
  ) &
  (
    bench 13b-6144-w1-diffusers 2 1 150 --shape $BIG $S6 --warmup 2 --steps 4 --baseline diffusers
    bench 13b-6144-w2 2,3 2 200 --shape $BIG $S6 --warmup 2 --steps 4 --a2a-mode both --overlap-chunks 1,2,4 \
      --comm-share --baseline diffusers
  ) &
  wait
  (bench 13b-27588-w2 0,1 2 200 --shape $BIG $S27 --warmup 1 --steps 2 --layouts 1x1x2,1x2x1 --a2a-mode both) &
  (
    bench 2b-640-seq-w2 2,3 2 90 --shape $SMALL $S2B --branch-mode sequential --warmup 3 --steps 10 \
      --layouts 1x1x2,1x2x1 --a2a-mode both
    generate gen-i2v-w2 2,3 2
  ) &
  wait
  bench 13b-6144-w4 0,1,2,3 4 200 --shape $BIG $S6 --warmup 2 --steps 4 --layouts 1x1x4,1x2x2,2x1x2,1x4x1 \
    --a2a-mode both --overlap-chunks 1,2 --comm-share --baseline diffusers
  bench 13b-27588-w4 0,1,2,3 4 200 --shape $BIG $S27 --warmup 1 --steps 2 --layouts 1x1x4,1x2x2,1x4x1 \
    --a2a-mode both --overlap-chunks 1,2
  bench 2b-640-seq-w4 0,1,2,3 4 90 --shape $SMALL $S2B --branch-mode sequential --warmup 3 --steps 10 \
    --layouts 1x1x4,1x2x2,1x4x1 --a2a-mode both
  generate gen-i2v-w4 0,1,2,3 4
  ;;
final)
  # The 13B set on the final code, eager and compiled, with profiles of the first configuration of each
  # launch; core's 2B-sequential, 27,588-token 2-GPU and generation runs are not repeated.
  # GPU 0 | GPU 1 | GPUs 2-3 side by side, then all four.
  (
    [ -z "${CPU_SMOKE:-}" ] && CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/microbench.py \
      --out "$W/other/micro.json" >"$W/logs/micro.log" 2>&1
    bench 13b-6144-w1 0 1 240 --shape $BIG $S6 --warmup 2 --steps 4 --compile --baseline diffusers \
      --profile "$W/other/profile-w1"
  ) &
  (bench 13b-27588-w1 1 1 240 --shape $BIG $S27 --warmup 1 --steps 2 --compile) &
  (
    bench 13b-6144-w2 2,3 2 240 --shape $BIG $S6 --warmup 2 --steps 4 --a2a-mode both --overlap-chunks 1,2 \
      --comm-share --baseline diffusers --compile --profile "$W/other/profile-w2"
  ) &
  wait
  bench 13b-6144-w4 0,1,2,3 4 200 --shape $BIG $S6 --warmup 2 --steps 4 --layouts 1x1x4,1x2x2,2x1x2,1x4x1 \
    --a2a-mode both --overlap-chunks 1,2 --comm-share --baseline diffusers --profile "$W/other/profile-w4"
  bench 13b-27588-w4 0,1,2,3 4 200 --shape $BIG $S27 --warmup 1 --steps 2 --layouts 1x1x4,1x2x2,1x4x1 \
    --a2a-mode both --comm-share
  bench 13b-6144-w4-compile 0,1,2,3 4 150 --shape $BIG $S6 --warmup 2 --steps 4 --a2a-mode both --compile
  bench 13b-27588-w4-compile 0,1,2,3 4 150 --shape $BIG $S27 --warmup 1 --steps 2 --compile
  ;;
ulysses)
  # The Ulysses layouts again after a change to usp.py alone (1-GPU numbers do not involve it).
  (bench 13b-6144-w2 0,1 2 200 --shape $BIG $S6 --warmup 2 --steps 4 --a2a-mode both --comm-share --compile) &
  (
    [ -z "${CPU_SMOKE:-}" ] && CUDA_VISIBLE_DEVICES=2 timeout 150 python3 bench/microbench.py \
      --out "$W/other/micro.json" >"$W/logs/micro.log" 2>&1
  ) &
  wait
  bench 13b-6144-w4 0,1,2,3 4 200 --shape $BIG $S6 --warmup 2 --steps 4 --layouts 1x1x4,1x2x2 --a2a-mode both \
    --comm-share --compile --profile "$W/other/profile-w4"
  bench 13b-27588-w4 0,1,2,3 4 200 --shape $BIG $S27 --warmup 1 --steps 2 --layouts 1x1x4 --a2a-mode both \
    --comm-share --compile
  ;;
one)
  # A one-GPU machine (nvidia-h200): the CUDA-only tests, the tiny model's image-to-video with and without
  # --compile (latents compared), then the 13B shape eager and compiled, with diffusers and profiles.
  if [ -z "${CPU_SMOKE:-}" ]; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_bench.py -k gpu \
      >"$W/logs/gpu-tests.log" 2>&1
    rc=$?; echo "$(date +%T) gpu tests: exit $rc"
    timeout 150 python3 bench/microbench.py --out "$W/other/micro.json" >"$W/logs/micro.log" 2>&1
  fi
  for mode in eager compile; do
    flag=$([ $mode = compile ] && echo --compile)
    timeout 300 python3 -m usp_infer generate $GEN_DEV $flag --prompt "a red fox running through fresh snow" \
      --image tests/data/first_frame.png $GEN_SIZE --steps 8 --guidance-scale 3 --stg-scale 1 --stg-blocks 1 \
      --guidance-rescale 0.7 -o "$W/gen/$mode.npz" --json --quiet >"$W/gen/generate-$mode.json" 2>"$W/logs/gen-$mode.log"
    rc=$?; echo "$(date +%T) generate $mode: exit $rc"
  done
  python3 -c "import numpy as np, sys; e, c = (np.load(f'{sys.argv[1]}/{m}.npz') for m in ('eager', 'compile')); \
print({k: float(np.abs(e[k].astype(float) - c[k]).max()) for k in e.files})" "$W/gen" >"$W/logs/gen-compare.log" 2>&1
  rm -f "$W"/gen/*.npz
  bench 13b-6144-w1 0 1 300 --shape $BIG $S6 --warmup 2 --steps 5 --compile --baseline diffusers \
    --profile "$W/other/profile-w1"
  bench 13b-27588-w1 0 1 300 --shape $BIG $S27 --warmup 1 --steps 3 --compile
  ;;
*)
  echo "unknown set $WHAT: use core, final, ulysses or one" >&2
  exit 2
  ;;
esac

python3 bench/plot.py "$W"/results/*.json --markdown "$W/other/table.md" --png "$W/other/scaling.png" \
  >"$W/logs/plot.log" 2>&1 || echo "plot failed: see logs/plot.log"
pack
cat "$W/other/table.md" 2>/dev/null || tail -5 "$W/logs/plot.log"
