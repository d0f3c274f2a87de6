#!/usr/bin/env bash
# Issue 16's cross-architecture seeds on a GPU machine in one device call: the jobs of
# bench/quality/dit.py that have no result yet, all at once (the digits models are launch-bound,
# so ten processes share one GPU well), under one overall limit so that results come back in $OUT.
#
#   cp runs/teachers/dit/{dkdm_model.json,model.safetensors,run.json} .gpu/dit-teacher/   # ignored
#   device tool: command "bash bench/quality/gpu_cross.sh JOB...", carry [".whl", ".gpu"], timeout_s 540
# (.whl as in bench/gpu.sh). Everything comes back as one file, $OUT/q.tgz (the device tool returns
# only a few files per call). Unpack it, copy q/results/*.json into the local root and run
# `python bench/quality/dit.py --root ROOT --dit-teacher DIR --report-only`.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/dkdm-gpu}
LIMIT=${LIMIT:-420}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_cross.log") 2>&1
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout -k 5 "$LIMIT" python3 bench/quality/dit.py --root "$OUT/q" --dit-teacher .gpu/dit-teacher \
    --out "$OUT/cross-architecture.md" --workers "${WORKERS:-10}" ${EXTRA:-} --only "$@"
echo "== exit $? after $SECONDS s"
for f in "$OUT"/q/logs/*.log; do echo "== $f"; tail -n 3 "$f"; done
tar czf "$OUT/q.tgz" -C "$OUT" q gpu_cross.log && rm -rf "$OUT/q"
exit 0
