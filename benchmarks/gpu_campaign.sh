#!/usr/bin/env bash
# The GPU campaign: ONE device call of at most 8 minutes (a GPU is lent for 15 device-minutes per
# issue, the machine's start included, so this leaves room for the start and one rerun).
#
# Here, once:   bash ../shared/tools/device-wheels.sh            # MONAI, lifelines, ... -> .whl/
# Then one device `run`, with carry [".whl"] and timeout_s 540:
#   LUNGCORE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_campaign.sh
# (the copy sent to the GPU machine may lack .git, so the commit travels in LUNGCORE_COMMIT).
#
# What it does, each step inside its own time box (seconds, overridable):
#   setup  (SETUP_S=120)  install .whl/ (if carried), build lungcore._C, check a GPU is visible
#   tests  (TESTS_S=210)  every op's CUDA tests: tests/ops on the GPU (each kernel compiled; fp32 /
#                         fp16 / bf16 against float64 references with DESIGN.md's tolerances;
#                         tests/ops/test_gpu_headline.py reruns every kernel on the same inputs and
#                         demands bit-identical results: a moving result is a race) + the other
#                         cuda-marked tests
#   bench  (BENCH_S=150)  benchmarks.run --device cuda --quick: the headline shapes of attention,
#                         patch embedding, Cox, resampling (each with its floor on this GPU,
#                         H200 or H100, and the % of it)
#                         and one training step of each network (bench_train); results are written
#                         after every op, so a step cut short still leaves what it measured
# Results: at most 8 files under $OUT (what the device tool brings back): environment.txt,
# tests.log, tests.xml, bench.log, bench.tgz (results.json, results.md, plots), summary.md.
# Unpack bench.tgz into benchmarks/results/ and commit it with summary.md (device, date, commit).
#
# Other steps (a rerun of one part): `bash benchmarks/gpu_campaign.sh tests [pytest args]` or
# `... bench [op ...]`.
# LUNGCORE_CAMPAIGN_CPU=1 is the dry run on a CPU machine (what CI runs: tests/benchmarks/
# test_gpu_campaign.py): the same steps and files, with the tests collected but not run and one
# cheap CPU benchmark, in well under a minute.
set -uo pipefail
step=${1:-all}
shift || true
OUT=${OUT:-/tmp/lungcore-campaign}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CPU=${LUNGCORE_CAMPAIGN_CPU:-}
[ -x .venv/bin/python ] && [ -n "$CPU" ] && PY=.venv/bin/python
SETUP_S=${SETUP_S:-120}
TESTS_S=${TESTS_S:-210}
BENCH_S=${BENCH_S:-150}
start=$(date +%s)
status_tests="not run"
status_bench="not run"

setup() {
  if [ -z "$CPU" ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 2; }
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "no .whl/ carried: MONAI/lifelines-dependent tests will be skipped (see device-wheels.sh)"
    fi
    $PY -c "import lungcore._C" 2>/dev/null \
      || timeout "$SETUP_S" $PY -m pip install -q --no-build-isolation --no-deps -e . \
      || { echo "building lungcore failed"; exit 2; }
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
      || { echo "no CUDA device visible: set LUNGCORE_CAMPAIGN_CPU=1 for a CPU dry run"; exit 3; }
  fi
  $PY - <<'PY' | tee "$OUT/environment.txt"
import os, platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
try:
    import cupy; cv = cupy.__version__
except ImportError:
    cv = None
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else None
print("commit", os.environ.get("LUNGCORE_COMMIT", "unknown"), "| python", platform.python_version(),
      "| torch", torch.__version__, "| triton", tv, "| cupy", cv, "| cuda", torch.version.cuda,
      "| device", gpu, "| SMs", sms)
PY
}

run_tests() {
  local args=("$@")
  if [ -n "$CPU" ]; then
    # the dry run collects the GPU tests (imports, markers, parametrisation) without running them
    args=(--collect-only -m cuda tests/ops "${args[@]}")
  elif [ ${#args[@]} -eq 0 ]; then
    args=(-n 8 tests/ops tests/metrics)
  fi
  timeout "$TESTS_S" $PY -m pytest -q -p no:cacheprovider --durations=15 --junitxml "$OUT/tests.xml" "${args[@]}" 2>&1 \
    | tee "$OUT/tests.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "tests stopped at ${TESTS_S}s: rerun the rest with: bash benchmarks/gpu_campaign.sh tests <paths>"
  status_tests="exit $rc"
  return "$rc"
}

run_bench() {
  local only=("$@")
  local device=cuda extra=()
  if [ -n "$CPU" ]; then
    device=cpu
    extra=(--budget 0.05)
    [ ${#only[@]} -eq 0 ] && only=(concordance)
  elif [ ${#only[@]} -eq 0 ]; then
    only=(attention patch_embed cox resample train)
  fi
  rm -rf "$OUT/bench"
  timeout "$BENCH_S" $PY -m benchmarks.run --device "$device" --quick "${extra[@]}" --only "${only[@]}" \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -n 60
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "benchmarks stopped at ${BENCH_S}s: rerun the rest with: bash benchmarks/gpu_campaign.sh bench <op ...>"
  [ -d "$OUT/bench" ] && tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
  status_bench="exit $rc"
  return "$rc"
}

summary() {
  {
    echo "# GPU campaign $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    cat "$OUT/environment.txt" 2>/dev/null
    echo
    echo "- tests: $status_tests; $(grep -E '[0-9]+ (passed|failed|error|skipped)|tests? collected' "$OUT/tests.log" 2>/dev/null | tail -n 1)"
    echo "- benchmarks: $status_bench"
    echo "- wall: $(( $(date +%s) - start )) s"
  } > "$OUT/summary.md"
  cat "$OUT/summary.md"
}

case "$step" in
  all)
    setup
    run_tests
    run_bench
    summary
    # the campaign's own outcome: the tests decide (benchmarks that ran out of time still leave files)
    [ "$status_tests" = "exit 0" ] ;;
  tests)
    setup
    run_tests "$@"; rc=$?
    summary; exit "$rc" ;;
  bench)
    setup
    run_bench "$@"; rc=$?
    summary; exit "$rc" ;;
  *)
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 64 ;;
esac
