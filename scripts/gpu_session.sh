#!/usr/bin/env bash
# The one script for a lent GPU machine (H100/H200): build with CUDA, run the tests, benchmark.
#
#   CASCADE_RT_COMMIT=<short hash> bash scripts/gpu_session.sh [phase ...]
#
# Phases (default, in this order): wheels build gpu_tests bench load pipeline profile; `tests` (the CPU
# suite, which CI runs anyway) only when named. It runs from the repo root and writes under $OUT
# (default ./out): session.log (one line per phase, rc and seconds), <phase>.log for each phase,
# bench_results.jsonl (every bench row, each tagged with its op) and the pipeline bench's
# pipeline.md table and pipeline.png chart: few files, so all of them come back from the machine.
# A failed phase is logged and the next one still runs; the exit status is 1 if any phase failed.
# Each phase has a time limit (seconds, overridable as e.g. LIMIT_pipeline=400); the defaults add
# up to 9 minutes, inside one 10-minute call. The pipeline bench writes each row as soon as it is
# measured, so a phase cut by its limit still returns what it measured. For more time, split the
# phases over two calls: `... wheels build gpu_tests bench`, then `... wheels build pipeline
# profile` (each call may land on a fresh machine, so each one builds).
# The copy of the tree on the machine has no .git: pass the commit for the result rows as above.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SESSION_LOG=$OUT/session.log
failed=()

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$SESSION_LOG"; }

# run_phase NAME LIMIT_SECONDS COMMAND...: output to $OUT/NAME.log, outcome to session.log.
run_phase() {
  local name=$1 limit=$2
  shift 2
  local var="LIMIT_$name"
  limit=${!var:-$limit}
  log "$name: start (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: rc=$rc in $((SECONDS - t0))s"
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SESSION_LOG"
  fi
}

phase_wheels() {
  # Carried wheels (e.g. diffusers, which the image lacks) go to a side folder on PYTHONPATH.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
}

phase_build() {
  # Build for the GPU that is here: compute capability 9.0 -> CUDAARCHS=90.
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
  echo "CUDAARCHS=$cap"
  # Also passed as a cache define: CUDAARCHS alone is ignored by a build folder configured before.
  CUDAARCHS=$cap CASCADE_RT_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -v \
    --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$cap" -e . &&
    "$PY" -c "from cascade_rt import _ext; assert _ext.has_cuda(), _ext.load_error(); print('CUDA kernels loaded')"
}

# Phases run under `timeout`, which needs a program: the functions are exported for `bash -c`.
export PY
export -f phase_wheels phase_build

log "machine: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader)"
log "python: $("$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1)"
log "commit: ${CASCADE_RT_COMMIT:-unknown (set CASCADE_RT_COMMIT)}"
export CASCADE_RT_COMMIT=${CASCADE_RT_COMMIT:-unknown}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(wheels build gpu_tests bench load pipeline profile)
rm -rf /tmp/bench_out && mkdir -p /tmp/bench_out
for phase in "${phases[@]}"; do
  case $phase in
  wheels)
    if compgen -G ".whl/*.whl" >/dev/null; then
      run_phase wheels 15 bash -c phase_wheels
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      log "wheels: none carried (.whl/ absent or empty)"
    fi
    ;;
  build) run_phase build 140 bash -c phase_build ;;
  gpu_tests) run_phase gpu_tests 75 "$PY" -m pytest -m gpu -q -p no:cacheprovider ;;
  # The rest of the suite; with gpu_tests above, the whole suite runs once.
  tests) run_phase tests 120 "$PY" -m pytest -m "not gpu" -q -p no:cacheprovider ;;
  bench)
    # Every op bench; loading and the pipeline have their own phases below.
    # shellcheck disable=SC2086 # BENCH_ARGS holds several words, e.g. "--only vq_lookup"
    run_phase bench 70 env OUT=/tmp/bench_out "$PY" bench/run_all.py --quick --skip pipeline --skip load --skip first_image ${BENCH_ARGS:-}
    ;;
  load) run_phase load 45 env OUT=/tmp/bench_out "$PY" bench/bench_load.py --quick ;;
  pipeline)
    # shellcheck disable=SC2086 # PIPELINE_ARGS, e.g. "--no-compile" or "--size lite"
    run_phase pipeline 155 env OUT=/tmp/bench_out "$PY" bench/bench_pipeline.py --quick ${PIPELINE_ARGS:-}
    cp /tmp/bench_out/pipeline.md /tmp/bench_out/pipeline.png "$OUT"/ 2>/dev/null
    ;;
  profile) run_phase profile 40 env OUT=/tmp/bench_out "$PY" bench/profile_step.py ;;
  *) log "unknown phase '$phase' (known: wheels build gpu_tests tests bench load pipeline profile)" && failed+=("$phase") ;;
  esac
done
# Benches write one <op>.jsonl each; they are merged so that few files come back.
if compgen -G "/tmp/bench_out/*.jsonl" >/dev/null; then
  cat /tmp/bench_out/*.jsonl >"$OUT/bench_results.jsonl"
fi

if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED phases: ${failed[*]}"
  exit 1
fi
log "all phases passed"
