#!/usr/bin/env bash
# Issue 28's grids on a GPU machine in one device call: bench/quality/questions.py with ten jobs at
# once (the digits models are launch-bound, so ten processes share one GPU well), under one overall
# limit, resuming what an earlier call left. Every run is resumable, so a grid larger than one call
# finishes over several: carry the last call's tarball back in.
#
#   mkdir -p .gpu && cp OUT_OF_LAST_CALL/questions.tgz .gpu/      # absent on the first call
#   device tool: command "bash bench/quality/gpu_questions.sh rho 0", carry [".whl", ".gpu"], timeout_s 540
# (.whl as in bench/gpu.sh). Arguments: the question, then the seeds (default 0 1 2). Everything
# comes back as $OUT/questions.tgz (the runs' directories, finished ones without their checkpoints,
# questions.json, the logs); unpack it into the runner's --out and rerun `questions.py --question Q --seeds ...` on a CPU
# to render the table from the finished runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/dkdm-gpu}
LIMIT=${LIMIT:-420}
QUESTION=${1:?usage: gpu_questions.sh QUESTION [SEED...]}
shift
SEEDS=${*:-0 1 2}
mkdir -p "$OUT/q"
exec > >(tee -a "$OUT/gpu_questions.log") 2>&1
source bench/gpu_env.sh
[ -f .gpu/questions.tgz ] && tar xzf .gpu/questions.tgz -C "$OUT/q"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout -k 5 "$LIMIT" python3 bench/quality/questions.py --question "$QUESTION" --seeds $SEEDS \
    --jobs "${JOBS:-10}" --out "$OUT/q"
echo "== exit $? after $SECONDS s"
for m in "$OUT"/q/*/*/metrics.json; do [ -f "$m" ] && rm -rf "$(dirname "$m")/checkpoints"; done  # finished: no resume needed
tar czf "$OUT/questions.tgz" -C "$OUT/q" . && rm -rf "$OUT/q"
exit 0
