#!/usr/bin/env bash
# Issue 6's GPU measurements in one device call (a few minutes on an H100 or H200): bench/speed.py
# plain, with a bf16 teacher, channels-last and torch.compile, then bench/ema.py; every speed.py run
# appends its row to bench/RESULTS.md, which is copied to $OUT to bring back.
#
# The device image has torch and accelerate but not diffusers. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
# then call the device tool with command "bash bench/gpu.sh", carry [".whl"], timeout_s 480.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, accelerate; print(torch.__version__, diffusers.__version__, accelerate.__version__)" || exit 1
for flags in "" "--teacher-dtype bfloat16" "--teacher-dtype bfloat16 --channels-last" \
             "--teacher-dtype bfloat16 --channels-last --compile" "--batch 1024 --teacher-dtype bfloat16"; do
    echo "== bench/speed.py --device cuda $flags"
    timeout 150 python3 bench/speed.py --device cuda $flags || echo "(failed or timed out: $flags)"
done
python3 bench/ema.py --device cuda --student unet:widths=128-256-256,layers=2 --shape 3,32,32
[ -n "${OUT:-}" ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
exit 0
