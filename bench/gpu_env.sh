# Sourced by the device scripts (bench/gpu.sh, bench/quality/gpu_*.sh) from the repository root: the
# wheels carried in .whl/ (a device machine reaches no index) installed apart, once per machine, then
# this checkout's src/ first on the path.
if ls .whl/*.whl >/dev/null 2>&1; then
    if [ ! -f /tmp/site/.installed ]; then
        timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
            && touch /tmp/site/.installed || exit 1
    fi
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
