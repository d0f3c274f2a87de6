#!/usr/bin/env bash
# Issue 28's grids on a GPU machine in one device call: bench/quality/questions.py, one runner per
# group, the groups side by side (the digits models are launch-bound, so a dozen processes share one
# GPU well), under one overall limit, resuming what an earlier call left. Every run is resumable, so a
# grid larger than one call finishes over several.
#
#   device tool: command "bash bench/quality/gpu_questions.sh rho:5:3.7M teacher_families:4 ceiling:7",
#                carry [".whl", ".gpu"], timeout_s 540
# A group is QUESTION:JOBS[:MATCH] (MATCH: only rows whose name contains it, questions.py --match);
# SEEDS (default "0 1 2") and LIMIT (seconds, default 420) from the environment; .whl as in
# bench/gpu.sh. The runs live in $RUNS (default /tmp/dkdm-q), so a second call on the same warm
# machine resumes them; a fresh machine starts from .gpu/questions.tgz if carried (e.g. finished
# runs' metrics.json, synthetic sets). Back in $OUT: results.tgz (every run's metrics.json,
# wall_s.txt, run.json, log.jsonl and the logs: what questions.py reads to render) and one
# teacher-NAME.tgz per teacher the runner trained (its weights, for distilling it elsewhere); unpack
# them into the runner's --out and rerun `questions.py --question Q --seeds ...` on a CPU to render.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/dkdm-gpu}
RUNS=${RUNS:-/tmp/dkdm-q}
LIMIT=${LIMIT:-420}
SEEDS=${SEEDS:-0 1 2}
[ $# -gt 0 ] || { echo "usage: gpu_questions.sh QUESTION:JOBS[:MATCH]..." >&2; exit 2; }
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/gpu_questions.log") 2>&1
source bench/gpu_env.sh
[ -f .gpu/questions.tgz ] && [ ! -f "$RUNS/.unpacked" ] && tar xzf .gpu/questions.tgz -C "$RUNS" && touch "$RUNS/.unpacked"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
pids=()
for group in "$@"; do
    IFS=: read -r question jobs match <<< "$group"
    timeout -k 5 "$LIMIT" python3 bench/quality/questions.py --question "$question" --seeds $SEEDS \
        --jobs "$jobs" ${match:+--match "$match"} --out "$RUNS" > "$OUT/$question.out" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; echo "== a runner exited $? after $SECONDS s"; done
(cd "$RUNS" && find . \( -name metrics.json -o -name wall_s.txt -o -name run.json -o -name log.jsonl \
    -o -name '*.log' -o -name questions.json \) -not -path './teachers/*' -not -path './synthetic/*' -print0 \
    | tar czf "$OUT/results.tgz" --null -T -)
for t in "$RUNS"/teachers/*/; do
    [ -f "$t/dkdm_model.json" ] && tar czf "$OUT/teacher-$(basename "$t").tgz" -C "$RUNS/teachers" \
        --exclude checkpoints "$(basename "$t")"
done
ls -la "$OUT"
exit 0
