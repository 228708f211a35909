#!/usr/bin/env bash
# Every GPU figure the project quotes, in one call on a machine with one NVIDIA GPU: the CUDA
# tests, then `jobs.benchmark` (bare model by precision and batch, torch.compile, the restorer
# over mixed sizes, CPU and device ms per image, start-up, and the whole jobs.restore process
# over many 480x320 images on each engine and compiled, with how busy the GPU was, and where a
# pass of the eager and of the compiled model goes).
#
#   infra/gpu_wheels.sh                 # where pip reaches PyPI: .whl/ for a machine without
#                                       # Ray, pydantic or ISA-L (skip where they are installed)
#   infra/gpu_check.sh [OUT]            # on the GPU machine, from a checkout; OUT: gpu-check/
#
# Prints the benchmark's table and writes OUT/bench.json and OUT/tests.txt. Each part has a
# time limit (7.8 minutes in all; on an H100 the tests and the benchmark took 6.7) and a part
# that fails does not stop the rest; the benchmark saves each section as it is done.
# The whole job runs over JOB_IMAGES (default 3000) thumbnails of JOB_SIZE (default mixed,
# 100-260 px a side; against the bare model they count by their pixels): at 408 images/s (the
# compiled job on an H100, 2026-11-27), 6 s of steady state. AGAINST=REV also runs the job as
# git revision REV has it, just before this tree's (before and after in one call). A rehearsal
# on a CPU:
#   DEVICE=cpu BATCHES=1 JOB_IMAGES=16 infra/gpu_check.sh /tmp/rehearsal
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
BATCHES=${BATCHES:-1,8,32,64,128}

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-check-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, pydantic, pyarrow; print('torch', torch.__version__, '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', '| pyarrow',
pyarrow.__version__)" || exit 1
python3 -c "import ray; print('ray', ray.__version__)" || echo "no Ray: the local engine only"

timeout 80 python3 -m pytest -q -p no:cacheprovider -rs tests/test_inference.py \
    tests/test_device_ops.py tests/test_model_parity.py 2>&1 | tee "$out/tests.txt" | tail -6
# In a session of its own, so that what it started can be stopped without touching anything else.
setsid timeout 390 python3 -m jobs.benchmark --device "${DEVICE:-cuda}" --seconds 3 \
    --batches "$BATCHES" \
    --compile --job "${JOB_IMAGES:-3000}" ${JOB_SIZE:+--job-size "$JOB_SIZE"} \
    ${AGAINST:+--against "$AGAINST"} --json "$out/bench.json" &
session=$!
wait "$session"
status=$?
echo "gpu_check: benchmark exit $status (124: its time limit)"
if [ "$status" = 124 ]; then
    # The job it was timing, and that job's local Ray, outlive it: stop that session's processes
    # (and only those), then print what was saved.
    pkill -s "$session" ; sleep 2
    [ -f "$out/bench.json" ] && python3 -m jobs.benchmark --render "$out/bench.json"
fi
