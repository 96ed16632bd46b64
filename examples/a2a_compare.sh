#!/usr/bin/env bash
# The two all-to-all implementations of --a2a-mode give bit-identical videos:
#   direct     = torch.distributed.all_to_all_single into a preallocated output (less per-call overhead)
#   functional = torch.distributed._functional_collectives.all_to_all_single + wait
# Both runs write .npz (frames + latents); the arrays are compared bit for bit. Compare the step
# times in the sidecars (timings.step_s) to see what the mode costs on your GPUs.
set -euo pipefail

MODEL=${MODEL:-models/ltx-tiny}
NPROC=${NPROC:-2}
HEIGHT=${HEIGHT:-64} WIDTH=${WIDTH:-96} FRAMES=${FRAMES:-9} STEPS=${STEPS:-4}
OUT=${OUT:-outputs/examples}

for mode in direct functional; do
    torchrun --nproc_per_node "$NPROC" -m usp_infer generate --model "$MODEL" \
        --prompt "a red fox running through fresh snow" \
        --height "$HEIGHT" --width "$WIDTH" --num-frames "$FRAMES" --steps "$STEPS" --seed 42 \
        --a2a-mode "$mode" --output "$OUT/a2a_$mode.npz" --overwrite --quiet
done

python - "$OUT/a2a_direct.npz" "$OUT/a2a_functional.npz" <<'PY'
import sys
import json
import numpy as np

direct, functional = (np.load(path) for path in sys.argv[1:])
for key in ("frames", "latents"):
    if not np.array_equal(direct[key], functional[key]):
        sys.exit(f"{key} differ between direct and functional all-to-all")
for path in sys.argv[1:]:
    steps = json.load(open(path + ".json"))["timings"]["step_s"]
    print(f"{path}: {1000 * sum(steps) / len(steps):.1f} ms/step")
print("direct and functional all-to-all give identical frames and latents")
PY
