#!/usr/bin/env bash
# Issue 27's table (docs/few-step.md, bench/quality/fewstep.py) on a GPU machine in one device call:
# every run of the seeds at once (the digits models are launch-bound, so a dozen processes share one
# GPU), then the scoring, under one overall limit.
#
#   device tool: command "bash bench/quality/gpu_fewstep.sh 0 1 2", carry [".whl"], timeout_s 540
# (.whl as in bench/gpu.sh). Arguments: the seeds (default 0 1 2); JOBS (default 12) and LIMIT
# (seconds, default 450) from the environment. The runs live in $RUNS (default /tmp/dkdm-fewstep),
# so a second call on the same warm machine resumes them. Back in $OUT: fewstep.json (the table's
# rows: render with `python bench/quality/fewstep.py --render fewstep.json`), fewstep.png, the log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/dkdm-gpu}
RUNS=${RUNS:-/tmp/dkdm-fewstep}
LIMIT=${LIMIT:-450}
SEEDS=${*:-0 1 2}
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/gpu_fewstep.log") 2>&1
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout -k 5 "$LIMIT" python3 bench/quality/fewstep.py --out "$RUNS" --seeds $SEEDS --jobs "${JOBS:-12}" --threads 4
echo "== exit $? after $SECONDS s"
cp "$RUNS"/fewstep.json "$RUNS"/fewstep.png "$OUT"/ 2>/dev/null
exit 0
