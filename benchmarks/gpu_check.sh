#!/usr/bin/env bash
# GPU check in one call: install seqmix (building csrc/ for sm_90), run the GPU tests, run the
# benchmarks, print the table last. Logs and JSON go to $OUT (or ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh [all|tests|bench]   # default all; QUICK=1: anchor shapes only
#
# Each part fits one 10-minute device call on its own if the two together do not; a warm machine
# keeps Triton's compile cache between calls.
# Optional comparators travel as wheels in .whl/ (ignored by git) and are installed to /tmp/site;
# for flash-linear-attention's kernels, on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
# bench_ssd compares with mamba_ssm's mamba_chunk_scan_combined when `mamba_ssm` imports (its package
# import loads a compiled extension, so it needs a wheel built for this torch/CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TORCH_CUDA_ARCH_LIST=9.0 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1
tail -n 3 "$out/install.log"
python3 -c "import seqmix._C as C; print('seqmix._C built for', C.cuda_archs())" 2>/dev/null || echo "seqmix._C: not built (see install.log)"

tests_rc=0
if [ "$part" != bench ]; then
  # One config per kernel in the tests (compiling every autotune config of every head dim costs
  # minutes); the benchmark autotunes and checks the tuned kernels against the reference itself.
  # Parallel workers spread the many compiles over the cores.
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  SEQMIX_AUTOTUNE=0 SEQMIX_HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -x $workers tests 2>&1 \
    | tee "$out/pytest.log" | tail -n 25
  tests_rc=${PIPESTATUS[0]}
fi

bench_rc=0
if [ "$part" != tests ]; then
  for bench in delta_rule gated_delta_rule gla ssd causal_conv1d dynamic_conv; do
    python3 -m benchmarks.bench_$bench ${QUICK:+--quick} --json "$out/bench_$bench.json" >> "$out/bench.log" 2>&1 \
      || bench_rc=1
  done
  python3 -m benchmarks.bench_recurrent_depth ${QUICK:+--quick} --decode-steps 8,32 \
    --json "$out/bench_recurrent_depth.json" >> "$out/bench.log" 2>&1 || bench_rc=1
  python3 -m benchmarks.bench_train --json "$out/bench_train.json" >> "$out/bench.log" 2>&1 || bench_rc=1
fi

echo
echo "== $part: tests exit $tests_rc, benchmarks exit $bench_rc =="
[ "$part" = tests ] || tail -n 50 "$out/bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
