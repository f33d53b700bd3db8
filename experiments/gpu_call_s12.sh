#!/usr/bin/env bash
# Session 12's device call, sized for one 10-minute call on whichever card comes (experiments/gpu_steps.sh steps):
# an H200 measures the SD1.5 compiled load (issue 18's H200 goals); an H100 the SDXL mixed shapes with compile
# cudagraphs (falling back to the eager fair-share run when the cudagraphs engine fails early) and b1 beside eager.
set -u
S=experiments/gpu_steps.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  bash $S gputests-loop:70 load-s12:510
else
  bash $S gputests-loop:70
  t=$(date +%s); bash $S load-sdxl-shapes-cg:360
  if ! ls "${OUT:-/tmp/out}"/load/*s12-cg.json >/dev/null 2>&1 && [ $(( $(date +%s) - t )) -lt 120 ]; then
    bash $S load-sdxl-shapes-fair:330
  else
    bash $S cg-sdxl:150
  fi
fi
