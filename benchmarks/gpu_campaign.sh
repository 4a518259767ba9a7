#!/usr/bin/env bash
# The GPU campaign (issue 11) in device-tool-sized steps: each step is ONE device call that ends
# inside the tool's 10-minute command limit, rebuilds what a bare machine lacks, and leaves a few
# files under $OUT (the tool brings back at most 8 files, 2 folders deep: folders are tarred).
#
# Here, once:   bash ../shared/tools/device-wheels.sh            # MONAI, lifelines, ... -> .whl/
# Then one device `run` per step, with carry [".whl"], e.g.
#   LUNGCORE_COMMIT=<sha> bash benchmarks/gpu_campaign.sh test-cuda   # the cuda-marked tests
#   LUNGCORE_COMMIT=<sha> bash benchmarks/gpu_campaign.sh test-all    # the whole suite, kernels compiled
#   LUNGCORE_COMMIT=<sha> bash benchmarks/gpu_campaign.sh bench [op ...]   # benchmarks.run --device cuda
# (<sha>: `git rev-parse --short HEAD` here; the copy sent to the GPU machine may lack .git.)
# Unpack what comes back into benchmarks/results/ and commit it (device, date and commit are in
# results.json). `LUNGCORE_CAMPAIGN_CPU=1` runs a step on a CPU machine (a smoke test of this script:
# `--quick` benchmarks, interpreter tests), writing to $OUT or /tmp/lungcore-campaign.
set -uo pipefail
step=${1:-}
shift || true
OUT=${OUT:-/tmp/lungcore-campaign}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -n "${LUNGCORE_CAMPAIGN_CPU:-}" ] && PY=.venv/bin/python
limit=${STEP_SECONDS:-530}  # inside the device tool's 600 s, with time for setup and tarring

setup() {
  if [ -z "${LUNGCORE_CAMPAIGN_CPU:-}" ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 2; }
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "no .whl/ carried: MONAI/lifelines-dependent tests will be skipped or fail (see device-wheels.sh)"
    fi
    $PY -c "import lungcore._C" 2>/dev/null || $PY -m pip install -q --no-build-isolation --no-deps -e . \
      || { echo "building lungcore failed"; exit 2; }
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
      || { echo "no CUDA device visible: set LUNGCORE_CAMPAIGN_CPU=1 for a CPU smoke run"; exit 3; }
  fi
  $PY - <<'PY' | tee "$OUT/environment.txt"
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print("python", platform.python_version(), "torch", torch.__version__, "triton", tv,
      "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
}

run_pytest() {  # $1: log name, rest: pytest arguments
  local name=$1; shift
  timeout "$limit" $PY -m pytest -q -p no:cacheprovider --durations=20 --junitxml "$OUT/$name.xml" "$@" 2>&1 \
    | tee "$OUT/$name.log" | tail -n 60
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "pytest stopped at ${limit}s: split the step (-k / a test folder) and run the rest"
  return "$rc"
}

case "$step" in
  test-cuda)
    setup
    run_pytest pytest-cuda -m cuda tests "$@" ;;
  test-all)
    setup
    run_pytest pytest-all tests "$@" ;;
  bench)
    setup
    quick=()
    [ -n "${LUNGCORE_CAMPAIGN_CPU:-}" ] && quick=(--quick)
    only=()
    [ $# -gt 0 ] && only=(--only "$@")
    device=cuda
    [ -n "${LUNGCORE_CAMPAIGN_CPU:-}" ] && device=cpu
    timeout "$limit" $PY -m benchmarks.run --device "$device" "${quick[@]}" "${only[@]}" --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | tail -n 80
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "benchmarks stopped at ${limit}s: run the remaining ops in another step (bench <op> ...)"
    tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
    exit "$rc" ;;
  *)
    sed -n '2,17p' "$0"; exit 64 ;;
esac
