#!/usr/bin/env bash
# Session 12's device call (what was left of its device time after failed starts: ~8 minutes): the SDXL mixed shapes
# with compile cudagraphs (falling back to the eager fair-share run when the cudagraphs engine fails early), then
# b1 latency beside eager (experiments/gpu_steps.sh steps).
set -u
S=experiments/gpu_steps.sh
bash $S gputests-loop:50
t=$(date +%s); bash $S load-sdxl-shapes-cg:290
if ! ls "${OUT:-/tmp/out}"/load/*s12-cg.json >/dev/null 2>&1 && [ $(( $(date +%s) - t )) -lt 120 ]; then
  bash $S load-sdxl-shapes-fair:260
else
  bash $S cg-sdxl:70
fi
