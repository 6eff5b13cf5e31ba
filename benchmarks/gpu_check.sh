#!/usr/bin/env bash
# One call on a GPU machine: install seqmix (building csrc/ for sm_90), run the GPU tests,
# run the benchmarks, print the table last. Logs and JSON go to $OUT (or ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh            # whole check
#   QUICK=1 bash benchmarks/gpu_check.sh    # anchor shapes only
#
# Optional comparators travel as wheels in .whl/ (ignored by git) and are installed to /tmp/site;
# for flash-linear-attention's kernels, on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TORCH_CUDA_ARCH_LIST=9.0 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$out/install.log" | tail -3
python3 -c "import seqmix._C as C; print('seqmix._C built for', C.cuda_archs())" || echo "seqmix._C: not built"

# One config per kernel in the tests (compiling every autotune config of every head dim costs
# minutes); the benchmark autotunes and checks the tuned kernels against the reference itself.
SEQMIX_AUTOTUNE=0 SEQMIX_HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -x tests 2>&1 | tee "$out/pytest.log" | tail -25
tests_rc=${PIPESTATUS[0]}

python3 benchmarks/bench_delta_rule.py ${QUICK:+--quick} --json "$out/bench_delta_rule.json" > "$out/bench.log" 2>&1
bench_rc=$?

echo
echo "== tests: exit $tests_rc; benchmarks: exit $bench_rc =="
tail -n 40 "$out/bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
