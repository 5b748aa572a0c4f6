#!/usr/bin/env bash
# Issue 33's GPU half in one command: the rollout benchmark (rollout.json, the issue's fields for 8 / 32 / 64 rows,
# and rollout_details.json) and the gpu-marked exactness tests of the fast generation path, each under its own time
# limit so that a hang in one still leaves the other's output, both printouts kept beside the results
# (rollout_details.json records the device and the torch / transformers / peft versions).
#
#   bash tools/gpu_rollout.sh                 # on a CUDA machine: writes into docs/results/gpu/
#   bash tools/gpu_rollout.sh OUTDIR          # ... into OUTDIR (a lent machine's output folder, say)
#   TINY=1 bash tools/gpu_rollout.sh /tmp/x   # the same steps on the CPU with the tiny model: a check of the script
#
# The benchmark runs first (it is the measurement; ~2 minutes on an H100/H200 by rollout.md's estimate), the tests
# second (~1-2 minutes). Exit status: the benchmark's, or else the tests'. Limits in seconds: BENCH_TIMEOUT (330),
# TESTS_TIMEOUT (240). PYTHON picks the interpreter (default: python3, else python).
set -uo pipefail
out=${1:+$(realpath -m -- "$1")}  # a given folder is taken from where the command runs, before the cd below
cd "$(dirname "$0")/.."
out=${out:-docs/results/gpu}
py=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
mkdir -p "$out" || { echo "gpu_rollout.sh: cannot create the output folder '$out'" >&2; exit 2; }

tiny=
[ "${TINY:-0}" = 1 ] && tiny=--tiny

timeout "${BENCH_TIMEOUT:-330}" "$py" tools/bench_rollout.py $tiny --json "$out/rollout.json" 2>&1 \
  | tee "$out/rollout_bench.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" = 124 ] && echo "gpu_rollout.sh: the benchmark ran past ${BENCH_TIMEOUT:-330} s and was stopped" >&2

timeout "${TESTS_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_generation.py 2>&1 \
  | tee "$out/rollout_gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" = 124 ] && echo "gpu_rollout.sh: the gpu tests ran past ${TESTS_TIMEOUT:-240} s and were stopped" >&2

echo "gpu_rollout.sh: benchmark exit $bench_rc, gpu tests exit $tests_rc; results and printouts in $out"
[ "$bench_rc" != 0 ] && exit "$bench_rc"
exit "$tests_rc"
