#!/usr/bin/env bash
# GPU check in one call. Logs and the results JSON go to $OUT (or ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh quick [--rehearse]   # the prepared call: fits one 9-minute device call
#   bash benchmarks/gpu_check.sh [all|tests|bench]     # the long runs (QUICK=1: bench at the anchor shapes only)
#
# quick, in order of importance, each stage flushing its results as it measures and bounded by what
# is left of QUICK_BUDGET_S (default 540 s), so a timeout keeps everything measured before it:
#   1. install seqmix with the CUDA extension for sm_90 (timed);
#   2. meta: GPU, versions, the card's copy bandwidth and bf16 matmul rate;
#   3. parity: every fused op at its anchor shape in bf16, forward and backward, against the float32
#      reference on the GPU, with and without an initial state, and decoding at T=1 (one autotune
#      config per kernel; one process per op, in parallel);
#   4. warm: every autotune config compiled into Triton's cache (one process per op, in parallel;
#      the seconds per op are the autotune set's compile time; bounded by QUICK_WARM_S, default 150 s);
#   5. bench: SDPA, then each op next to fla-core 0.6.0 and mamba_ssm when they import, fwd and fwd+bwd,
#      one process per op bounded by QUICK_BENCH_OP_S (default 60 s), and each autotuned kernel's choice;
#   6. train: ~50M LM training step, DeltaNet vs attention, B8 T2048 bf16;
#   7. decode: ms/token at B=1, eager and CUDA graph;
#   8. tests: the GPU test suite with what time is left.
# The table (python -m benchmarks.results_table) is printed last. Commit $OUT/results.json as
# benchmarks/results/<date>-<gpu>.json. QUICK_STAGES="train decode" (say) runs only those stages
# after the install, for a second call that finishes what the first one's budget cut off (the meta
# stage's ceilings are then missing: the floors fall back to the anchors' H100 ceilings), and
# QUICK_OPS="gla ssd" (say) gives the parity, warm and bench stages those ops of benchmarks/anchors.py
# only. The tests stage writes each failure's traceback to $OUT/failures.log as it happens; QUICK_TESTS
# (paths or node ids, space-separated) runs those tests instead of the whole suite.
#
# --rehearse: the same script on the CPU (Triton interpreter, tiny shapes, float32, no install, a
# few tests), so a script error costs no GPU time. Its figures are not performance.
#
# fla-core travels as a wheel in .whl/ (ignored by git; the device call names it in `carry`), made
# on a machine with pip, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
# Every wheel in .whl/ is installed to /tmp/site. bench_ssd's mamba_ssm comparator needs a wheel
# built for the machine's torch/CUDA (its import loads a compiled extension).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
rehearse=""
[ "${2:-}" = "--rehearse" ] && rehearse="--rehearse"
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$SECONDS

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

install_seqmix() {
  local t0=$SECONDS
  if [ -n "$rehearse" ]; then  # check that the build's metadata step runs, install nothing
    python3 -m pip install --dry-run -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1
  else
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . \
      > "$out/install.log" 2>&1
  fi
  local rc=$?
  export SEQMIX_INSTALL_S=$((SECONDS - t0))
  echo "install: exit $rc in ${SEQMIX_INSTALL_S}s"; tail -n 3 "$out/install.log"
  # (torch first: the extension links against its libraries, which its import alone does not load)
  python3 -c "import torch, seqmix._C as C; print('seqmix._C built for', C.cuda_archs())" 2>/dev/null \
    || echo "seqmix._C: not built (see install.log)"
}

if [ "$part" = quick ]; then
  budget=${QUICK_BUDGET_S:-540}
  jobs=${QUICK_JOBS:-8}
  if [ -n "$rehearse" ]; then
    export TRITON_INTERPRET=1
    jobs=${QUICK_JOBS:-2}
  fi
  rm -f "$out/results.json" "$out/gpu_check.log"
  stages=${QUICK_STAGES:-meta parity warm bench train decode tests}
  wants() { [[ " $stages " == *" $1 "* ]]; }
  left() { echo $((budget - (SECONDS - start))); }
  # run CAP CMD...: CMD bounded by CAP seconds and by what is left of the budget (keeping 15 s for the table)
  run() {
    local cap=$1; shift
    local t=$(( $(left) - 15 < cap ? $(left) - 15 : cap ))
    if [ "$t" -lt 5 ]; then echo "skipped (budget spent): $*"; return 0; fi
    timeout -k 5 "$t" "$@"; local rc=$?
    [ $rc -eq 124 ] && echo "timed out after ${t}s: $*"
    return $rc
  }
  # parallel STAGE CAP OPS...: one process per op (at most $jobs at once), each into its own results file,
  # merged after
  parallel() {
    local stage=$1 cap=$2 tmp=/tmp/gpu_quick_$1
    shift 2
    rm -rf "$tmp"
    printf '%s\n' "$@" | run "$cap" xargs -P "$jobs" -I{} \
      python3 -m benchmarks.gpu_quick "$stage" --ops {} --out "$tmp/{}" $rehearse
    echo "$stage: exit $?"
    if compgen -G "$tmp/*/results.json" >/dev/null; then
      python3 -m benchmarks.gpu_quick merge "$tmp"/*/results.json --out "$out"
    fi
  }
  {
    install_seqmix
    ops=${QUICK_OPS:-$(python3 -c "from benchmarks.anchors import ANCHORS; print(' '.join(a.op for a in ANCHORS))")}
    wants meta && run 30 python3 -m benchmarks.gpu_quick meta --out "$out" $rehearse
    wants parity && parallel parity 120 $ops
    wants warm && parallel warm "${QUICK_WARM_S:-150}" $ops lm
    if wants bench; then  # one process per op, each bounded, so that one slow op leaves the others their time
      for op in sdpa $ops; do
        run "${QUICK_BENCH_OP_S:-60}" python3 -m benchmarks.gpu_quick bench --ops "$op" --out "$out" $rehearse
      done
    fi
    wants train && run 80 python3 -m benchmarks.gpu_quick train --out "$out" $rehearse
    wants decode && run 50 python3 -m benchmarks.gpu_quick decode --out "$out" $rehearse
    if wants tests; then
      if [ -n "$rehearse" ]; then
        tests=(tests/test_benchmarks.py -k floor)
      else
        workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
        tests=($workers ${QUICK_TESTS:-tests})
      fi
      t=$(( $(left) - 20 ))
      if [ "$t" -ge 30 ]; then
        python3 -m benchmarks.gpu_quick tests --out "$out" $rehearse --seconds "$t" --pytest-args "${tests[@]}"
      else
        echo "tests: skipped, ${t}s left"
      fi
    fi
  } 2>&1 | tee -a "$out/gpu_check.log"
  echo
  echo "== quick check, $((SECONDS - start))s =="
  python3 -m benchmarks.results_table "$out/results.json"
  exit 0
fi

install_seqmix
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
  python3 -m benchmarks.bench_decode --json "$out/bench_decode.json" >> "$out/bench.log" 2>&1 || bench_rc=1
  python3 -m benchmarks.bench_pooling op --json "$out/bench_pooling.json" >> "$out/bench.log" 2>&1 || bench_rc=1
fi

echo
echo "== $part: tests exit $tests_rc, benchmarks exit $bench_rc =="
[ "$part" = tests ] || tail -n 50 "$out/bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
