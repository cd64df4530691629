#!/usr/bin/env bash
# The GPU targets of docs/benchmarks.md in one run, for a session that has a GPU for a few minutes:
#   bash benchmarks/gpu_targets.sh                                  # SD1.5-shaped random backbone, 512 px, bf16
#   BACKBONE=tiny PRECISION=32-true bash benchmarks/gpu_targets.sh   # the same commands as a dry run on a CPU
# Each line prints its table; the whole log is also written to ${LOG_DIR:-/tmp}/gpu_targets.log.
set -euo pipefail
cd "$(dirname "$0")/.."
backbone=${BACKBONE:-sd15}
precision=${PRECISION:-bf16-mixed}
steps=${STEPS:-10}
log=${LOG_DIR:-/tmp}/gpu_targets.log
: > "$log"

run() {
    echo "\$ python benchmarks/ti_speed.py --backbone $backbone --precision $precision --steps $steps $*" | tee -a "$log"
    # one failed line (say, out of memory) must not cost the lines after it
    python benchmarks/ti_speed.py --backbone "$backbone" --precision "$precision" --steps "$steps" "$@" 2>&1 |
        tee -a "$log" || echo "(failed: exit ${PIPESTATUS[0]})" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$log" || true
# batch-1 peak memory, gradient checkpointing off and on (target: <= 4 GiB with it on)
run --batch 1 --methods ti --no-baseline
run --batch 1 --methods ti --no-baseline --set gradient_checkpointing=true
# DreamArtist's step time over TI's (target: <= 2.2x without reconstruction) and the share of the bf16 peak
# at large batches (target: >= 50%)
run --batch 8 32 --methods ti da --no-baseline
# what channels-last buys at the large batch
run --batch 32 --methods ti --no-baseline --set channels_last=true
# last, as the longest (each compiled variant compiles cold for minutes on SD1.5 shapes): what CUDA graphs buy
# at batch 1, and whether the compiled step's gradient is eager's on the GPU
echo "\$ python benchmarks/compile_check.py --backbone $backbone --precision $precision --batch 1" | tee -a "$log"
python benchmarks/compile_check.py --backbone "$backbone" --precision "$precision" --batch 1 \
    --variants eager reduce-overhead 2>&1 | tee -a "$log" || echo "(failed)" | tee -a "$log"
