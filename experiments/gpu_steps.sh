#!/usr/bin/env bash
# Run named GPU measurement steps in order, each under its own time limit, logs and JSON under $OUT.
#   bash experiments/gpu_steps.sh STEP:SECONDS [STEP:SECONDS ...]
# A step that times out is logged and the next one still runs (one device call spends its budget on what it can).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 SDSERVE_CACHE_DIR=${SDSERVE_CACHE_DIR:-/tmp/sdserve-cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
step() {
  case "$1" in
    gputests-loop) python3 -m pytest -q -rA -m gpu tests/core/test_device_copy.py tests/core/test_step_scheduler_gpu.py tests/core/test_call_timer.py tests/core/test_compile_cudagraphs.py tests/core/test_compile_aoti.py -p no:cacheprovider -o addopts="" ;;
    gputests) python3 -m pytest -q -rA -m gpu tests/core -p no:cacheprovider -o addopts="" ;;
    lora-sd15) python3 -m benchmarks.lora_bench --model sd15 --steps 30 --rank 32 --rounds 2 --compile reduce-overhead -o "$OUT/lora-sd15.json" ;;
    lora-sd15-eager) python3 -m benchmarks.lora_bench --model sd15 --steps 30 --rank 32 --rounds 3 -o "$OUT/lora-sd15-eager.json" ;;
    host-sdxl) python3 experiments/host_overhead.py --model sdxl --device cuda --size 512 --steps 10 20 --out "$OUT/host-sdxl.json" && python3 experiments/host_overhead.py --model sdxl --device cuda --size 512 --steps 10 20 --opt '{"fuse_qkv":true,"channels_last":true,"sdpa_backend":"cudnn"}' --out "$OUT/host-sdxl-opt.json" ;;
    lora-sdxl) python3 -m benchmarks.lora_bench --model sdxl --steps 30 --rank 32 --rounds 2 -o "$OUT/lora-sdxl-eager.json" ;;
    lora-sdxl-compiled) python3 -m benchmarks.lora_bench --model sdxl --steps 30 --rank 32 --compile reduce-overhead -o "$OUT/lora-sdxl.json" ;;
    cold-sdxl) python3 -m benchmarks.cold_start --family sdxl --out "$OUT/cold" ;;
    cold-sdxl-aoti) python3 -m benchmarks.cold_start --family sdxl --compile aoti --out "$OUT/cold" ;;
    cold-sd15-aoti) python3 -m benchmarks.cold_start --family sd15 --compile aoti --out "$OUT/cold" ;;
    aoti-b1) python3 -m benchmarks.gpu_bench --workloads sd15-512-50,sdxl-1024-30 --batches 1 --variants diffusers-compile,sdserve --extra-sdserve '{"sdserve-aoti": {"compile": "aoti"}}' --repeats 3 --no-flops --out "$OUT/aoti-b1" ;;
    cold-sd15) python3 -m benchmarks.cold_start --family sd15 --out "$OUT/cold" ;;
    presets-sdxl) python3 -m benchmarks.preset_quality --workload sdxl-1024-30 --presets fast --cache-dir /tmp/pq-cache --out "$OUT/presets" ;;
    presets-sd15) python3 -m benchmarks.preset_quality --workload sd15-512-50 --presets fast,fastest --cache-dir /tmp/pq-cache --out "$OUT/presets" ;;
    b1-sd15) python3 -m benchmarks.gpu_bench --workloads sd15-512-50 --batches 1 --variants diffusers-eager,diffusers-compile,sdserve --repeats 3 --no-flops --extra-sdserve '{"sdserve-capture-step": {"capture_step": true}}' --out "$OUT/b1-sd15.json" ;;
    load) python3 -m benchmarks.load configs/serve-sd15-bench.yaml --profiles uniform,mixed --admission step,batch --rates 0.7,1.1 --duration-s 15 --capacity-requests 96 --out "$OUT/load" --tag s10 ;;
    load-s12) python3 -m benchmarks.load configs/serve-sd15-bench.yaml --profiles uniform,mixed --admission step,batch --one-engine --rates 1.1 --duration-s 15 --capacity-requests 96 --out "$OUT/load" --tag s12 ;;
    cg-sdxl) python3 -m benchmarks.gpu_bench --workloads sdxl-512-30 --batches 1 --variants diffusers-eager --extra-sdserve '{"sdserve-eager": {"compile": "none"}, "sdserve-cudagraphs": {"compile": "cudagraphs"}}' --repeats 3 --no-flops --out "$OUT/cg-sdxl" ;;
    load-sdxl-shapes-cg) python3 -m benchmarks.load configs/serve-sdxl-bench-cg.yaml --profiles mixed-shapes --capacity-profile mixed-shapes --admission step --rates 0.5,0.7 --duration-s 30 --capacity-requests 40 --out "$OUT/load" --tag s12-cg ;;
    load-batch) python3 -m benchmarks.load configs/serve-sd15-bench.yaml --profiles uniform,mixed --admission batch --rates 0.7,1.1 --duration-s 15 --capacity-requests 96 --capacity-from benchmarks/results/load/2026-12-07-NVIDIA-H100-80GB-HBM3-sd15-uniform-step-r0.7-s10.json --out "$OUT/load" --tag s10 ;;
    load-sdxl-shapes-fair) python3 -m benchmarks.load configs/serve-sdxl-bench.yaml --profiles mixed-shapes --capacity-profile mixed-shapes --admission step --rates 0.5,0.7 --duration-s 40 --capacity-requests 48 --out "$OUT/load" --tag s12 ;;
    load-sdxl-shapes) python3 -m benchmarks.load configs/serve-sdxl-bench.yaml --profiles mixed-shapes --capacity-profile mixed-shapes --admission step,batch --rates 0.7 --duration-s 20 --capacity-requests 48 --out "$OUT/load" --tag s10 ;;
    syncs) python3 experiments/sync_probe.py --source embedded:sd15 --out "$OUT/syncs-sd15.json" ;;
    syncs-before) python3 experiments/sync_probe.py --source embedded:sd15 --before --out "$OUT/syncs-before-sd15.json" ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}
if [ "${1:-}" = "--one" ]; then step "$SDSERVE_STEP"; exit $?; fi
for spec in "$@"; do
  name=${spec%%:*}; secs=${spec##*:}
  start=$(date +%s)
  echo "=== $name (limit ${secs}s) $(date -u +%T)"
  # timeout signals its whole process group, so a step's children (Ray, benchmark children) go too
  SDSERVE_STEP="$name" timeout --kill-after=10 "$secs" bash "$0" --one > "$OUT/$name.log" 2>&1; rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - start ))s"; tail -5 "$OUT/$name.log"
done
