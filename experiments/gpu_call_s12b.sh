#!/usr/bin/env bash
# Session 12's last device call (~6 minutes of device time left after failed starts): the cudagraphs GPU tests, then
# SDXL 512² b1 latency: diffusers eager, sdserve eager, sdserve compile cudagraphs (experiments/gpu_steps.sh steps).
set -u
bash experiments/gpu_steps.sh gputests-loop:50 cg-sdxl:130
