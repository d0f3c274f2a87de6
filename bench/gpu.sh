#!/usr/bin/env bash
# Issue 14's GPU measurements in one device call that cannot stall: every command runs under its
# own `timeout`, capped by what is left of an overall budget (8 minutes with the set-up), most
# important first. bench/speed.py adds a row to bench/RESULTS.md per student as soon as it is
# measured; RESULTS.md and the whole log (gpu.log) are copied to $OUT after every command.
#
#   1. the digits default (bench/speed.py) with CUDA graphs and plain: no row yet (2026-11-26:
#      nothing inside 120 s, before exact preparation stopped paying cuDNN's autotuner per size)
#   2. CIFAR-10 scale (ADM teacher 52.5M, students of ~10M, batch 128): bf16 + torch.compile (adm),
#      the one lever left for the 25 ms target; then the dit student with bf16 + CUDA graphs
#   3. CIFAR-10 scale with the teacher's weights in bf16 and CUDA graphs (adm and unet with
#      graphs and bf16 autocast have rows: 48 ms a DKDM step)
#   4. ImageNet-64 scale (ADM teacher 121M), bf16 + CUDA graphs
#   5. the CUDA-graph equivalence test and the attention tests (passed on an H100, 2026-11-26)
# Limits follow the H100 run of 2026-11-26: about 25 s of start-up per command, the adm and unet
# students with graphs in 60 s together, a plain float32 adm row in 80 s.
# "bf16" is the student's --mixed-precision bf16 with the teacher's network under bf16 autocast
# (--teacher-autocast bf16); --teacher-dtype bfloat16 casts the teacher's weights instead.
#
# The device image has torch, accelerate, pytest and scikit-learn but not diffusers. Once, here,
# in the repo root:
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# then call the device tool with command "bash bench/gpu.sh", carry [".whl"], timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dkdm-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
BUDGET=${BUDGET:-465}  # seconds for everything from here on
START=$SECONDS

run() {  # run LIMIT COMMAND...: at most LIMIT seconds, and never past the budget
    local limit=$1 left=$((BUDGET - (SECONDS - START)))
    shift
    if [ "$left" -lt 15 ]; then
        echo "== skipped, budget spent: $*"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== [$((SECONDS - START)) s, limit $limit s] $*"
    timeout -k 5 "$limit" "$@"
    local code=$?
    [ "$code" -ne 0 ] && echo "== exit $code (124: timed out): $*"
    cp bench/RESULTS.md "$OUT/RESULTS.md"
}

source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 60 python3 -c "import torch, diffusers, accelerate, dkdm.trainer; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())" || exit 1

SPEED="python3 bench/speed.py --device cuda"
C10="$SPEED --scale cifar10 --steps 30 --warmup 5"
BF16="--mixed-precision bf16 --teacher-autocast bf16"
run 120 $SPEED --steps 100 --cuda-graphs
run 90 $SPEED --steps 100
run 150 $C10 $BF16 --compile --students adm
run 45 $C10 $BF16 --cuda-graphs --students dit
run 45 $C10 --mixed-precision bf16 --teacher-dtype bfloat16 --cuda-graphs --students adm
run 60 $SPEED --scale imagenet64 --steps 20 --warmup 5 $BF16 --cuda-graphs --students adm
run 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py tests/test_adm.py -k "cuda or sdpa"
echo "== done in $((SECONDS - START)) s"
exit 0
