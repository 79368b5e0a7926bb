#!/usr/bin/env bash
# The one script a session with a lent GPU runs (bench/README.md, "On a GPU").
#
#   bash bench/gpu_run.sh [STAGE ...]        (default: all stages, in order)
#
# Stages:
#   quick    THE ONE CALL FOR A 15-MINUTE DEVICE BUDGET (about 9 minutes of work): setup, then
#            (in the background) the benchmark grid's kernel variants compiled into Triton's
#            cache, the kernel tests on the GPU (junit XML, capped at 100 s), then only the
#            benchmarks behind the speed targets (issue 3: 7B FFN fused forward at 4096/16384
#            tokens, decode 32/256 users, forward+backward at 512/4096; issue 5: runtime decode and
#            joint training, 180 s; issue 4: the whole decoder layer), then, in the time left of
#            MILP_QUICK_TOTAL_S (540), the rest of the op grid. No report on the device: make it
#            here from the returned bench_quick_*.json. Run it as
#              MILP_GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu_run.sh quick
#            with timeout_s 600; what a capped stage finished still lands in its JSON.
#   setup    pip install --no-deps --no-build-isolation -e . (if `import kernels` fails); env.txt
#   tests    pytest tests on the GPU (Triton compiled, no interpreter)
#   kernel-tests  pytest tests/kernels on the GPU (limit MILP_KERNEL_TESTS_S) -> tests_gpu.xml
#   precompile    the benchmark grid's kernel variants into Triton's cache, in the background
#   profile  bench/profile_step.py: torch.profiler tables and trace of forward + backward at 512
#            tokens -> profile_*.txt, profile_*.json (the unexplained 1.4 ms of the first H200 run)
#   probe    bench/probe_split.py: the split path's pieces and orders timed (limit MILP_PROBE_S)
#            -> probe_split.json. A short call for a few minutes left of a budget:
#              MILP_KERNEL_TESTS_S=90 MILP_PROBE_S=50 MILP_TEST_WORKERS=16 \
#                bash bench/gpu_run.sh setup precompile kernel-tests probe
#   decode   pytest bench/test_lora_linear.py -k decode    -> bench_decode.json
#   prefill  pytest bench/test_lora_linear.py -k prefill   -> bench_prefill.json
#   bwd      pytest bench/test_lora_backward.py            -> bench_bwd.json
#   ops      pytest bench/test_lora_shrink.py bench/test_lora_expand.py -> bench_ops.json
#   aot      python -m kernels.aot (registers/spills/wgmma of the launch configs) -> aot.txt
#   autotune python -m kernels.autotune --quick --jobs 14 (candidates compiled in parallel first):
#            tuned configs merged into kernels/configs/<gpu>.json there (later stages of the call
#            use them) and copied to $OUT; copy it over kernels/configs/ here and commit it
#   others   the other bench files (test_search.py, test_runtime.py, ...) -> bench_others.json
#   report   bench/report.py over every bench_*.json in $OUT and bench/results/gpu/
#
# Everything goes to $OUT (set by the device machine; default bench/results/gpu_local) and the
# JSONs/report are also copied to bench/results/gpu/. Each stage runs under `timeout -s INT`
# (MILP_STAGE_TIMEOUT seconds, default 540) so an interrupted pytest still writes its JSON.
# A device call is limited to 10 minutes: run the stages over several calls, e.g.
#   1) setup tests   2) setup decode   3) setup prefill   4) setup bwd ops others report
# and pass MILP_GIT_COMMIT=$(git rev-parse HEAD) (the device's copy has no .git).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# every stage name is checked before any stage runs: a misspelt one in the middle of a list must
# not end the call after the stages before it have spent the device time
STAGE_NAMES="quick setup tests kernel-tests precompile probe profile decode prefill bwd ops aot autotune others report all"
for s in "$@"; do
    case " $STAGE_NAMES " in
        *" $s "*) [[ -n "$s" && "$s" != *" "* ]] && continue ;;
    esac
    echo "unknown stage '$s' ($STAGE_NAMES)" >&2
    exit 2
done
OUT="${OUT:-bench/results/gpu_local}"
RES=bench/results/gpu
mkdir -p "$OUT"
# results are copied into the repository's bench/results/gpu/ only from a GPU run (a CPU dry run
# of the script, e.g. OUT=/tmp/x bash bench/gpu_run.sh quick, leaves the repository alone)
if "${PYTHON:-python3}" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    mkdir -p "$RES"
else
    RES=""
fi
keep() { [ -n "$RES" ] && cp "$@" "$RES/" 2>/dev/null; return 0; }
PY="${PYTHON:-python3}"
T="${MILP_STAGE_TIMEOUT:-540}"
export PYTHONUNBUFFERED=1
# what tests/conftest.py and bench/conftest.py set: it is part of Triton's cache key, so the
# background precompile (below) must see the same value as the benchmarks
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export MILP_GIT_COMMIT="${MILP_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
LOG="$OUT/run.log"
STATUS=0

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

TUNED_DIR=/tmp/milp_tuned  # tuned config files of this machine's earlier calls (the autotune stage)

setup() {
    if compgen -G "$TUNED_DIR/*.json" >/dev/null; then
        log "restoring the configs tuned by an earlier call on this machine: $(ls "$TUNED_DIR")"
        cp "$TUNED_DIR"/*.json kernels/configs/
    fi
    # wheels the device lacks (it has pytest-xdist), carried in .device_wheels (git-ignored):
    #   pip download --no-deps -d .device_wheels NAME==VERSION   (here), carry [".device_wheels"]
    if compgen -G ".device_wheels/*.whl" >/dev/null; then
        log "installing carried wheels: $(ls .device_wheels)"
        "$PY" -m pip install -q --no-deps --no-index .device_wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    fi
    # checked from / : in the repository root the packages import from the working directory,
    # but scripts under bench/ (probe_split.py, variants.py) would not find them
    if ! (cd / && "$PY" -c "import kernels, milp") >/dev/null 2>&1; then
        log "installing the project (no deps, no build isolation)"
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG"
    fi
    {
        echo "commit: $MILP_GIT_COMMIT"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
        "$PY" - <<'PY'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1))
try:
    from importlib.metadata import version
    print("peft", version("peft"), "| pytest-benchmark", version("pytest-benchmark"))
except Exception as exc:
    print("versions:", exc)
PY
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt" | tee -a "$LOG"
}

run_tests() {  # run_tests [pytest paths/args...]  (default: tests)
    local args=("$@")
    [ ${#args[@]} -eq 0 ] && args=(tests)
    log "pytest ${args[*]} (GPU), limit ${T}s"
    local extra=()
    "$PY" -c "import pytest_timeout" >/dev/null 2>&1 && extra+=(--timeout=300)
    # several workers compile the Triton variants in parallel, where pytest-xdist is installed
    "$PY" -c "import xdist" >/dev/null 2>&1 && extra+=(-n "${MILP_TEST_WORKERS:-8}")
    # tests that would start in the last fifth of the cap are skipped (tests/conftest.py), so the
    # session ends by itself and writes its junit XML; the timeout is the backstop
    local margin=$(( T / 5 > 20 ? T / 5 : 20 ))
    MILP_TEST_DEADLINE=$(( $(date +%s) + T - margin )) \
    timeout -s INT -k 30 "$T" "$PY" -m pytest "${args[@]}" -q -p no:cacheprovider -rfEs \
        --junitxml="$OUT/tests_gpu.xml" "${extra[@]}" 2>&1 | tail -n 60 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "pytest tests exit code $rc"
    [ "$rc" -eq 0 ] || STATUS=1
    [ -f "$OUT/tests_gpu.xml" ] && keep "$OUT/tests_gpu.xml"
}

cache_entries() {  # kernels in Triton's cache (how many a stage compiled: did the precompile hit?)
    find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l
}

bench() {  # bench NAME pytest-args...
    local name=$1; shift
    local json="$OUT/bench_$name.json"
    local c0
    c0=$(cache_entries)
    log "pytest bench stage '$name' (limit ${T}s): $*"
    timeout -s INT -k 30 "$T" "$PY" -m pytest "$@" -q -p no:cacheprovider --benchmark-json="$json" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "stage '$name' exit code $rc; Triton cache entries $c0 -> $(cache_entries)"
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || STATUS=1
    [ -f "$json" ] && keep "$json"
}

others() {
    local files=()
    for f in bench/test_*.py; do
        case "$(basename "$f")" in
            test_lora_linear.py|test_lora_backward.py|test_lora_shrink.py|test_lora_expand.py) ;;
            *) files+=("$f") ;;
        esac
    done
    if [ ${#files[@]} -eq 0 ]; then log "no other bench files"; return; fi
    bench others "${files[@]}"
}

report() {
    local jsons=() seen=" "
    for f in "$OUT"/bench_*.json ${RES:+"$RES"/bench_*.json}; do
        [ -f "$f" ] || continue
        case "$seen" in *" $(basename "$f") "*) continue ;; esac
        seen="$seen$(basename "$f") "
        jsons+=("$f")
    done
    if [ ${#jsons[@]} -eq 0 ]; then log "report: no bench_*.json yet"; STATUS=1; return; fi
    log "report over ${jsons[*]}"
    "$PY" bench/report.py "${jsons[@]}" --out "$OUT" 2>&1 | tee -a "$LOG"
    keep "$OUT"/*.md "$OUT"/*.png
}

# the benchmarks behind the speed targets (quick stage): -k expressions over the full-size ids
QUICK_FWD='7b and (prefill-T4096-U32-mix-none10 or prefill-T16384-U32-mix-none10 or decode-T32-U32-mix or decode-T256-U256-mix)'
QUICK_BWD='7b and (prefill-T512-U32-mix-none10 or prefill-T4096-U32-mix-none10)'

precompile() {  # warm Triton's cache with the benchmark grid's kernel variants while the tests run
    # bench/variants_bf16.jsonl: `python bench/variants.py --out bench/variants_bf16.jsonl` (on a CPU);
    # kernels.aot compiles each variant under the key the JIT computes, so the bench stages find
    # them compiled. Best effort: a variant it misses is compiled by the benchmark as before.
    local f=bench/variants_bf16.jsonl
    [ -f "$f" ] && [ -n "$RES" ] || return 0  # GPU runs only
    local arch tmp
    arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(M * 10 + m)") || return 0
    tmp=$(mktemp)
    log "precompiling $(wc -l < "$f") benchmark kernel variants for sm_$arch in the background"
    ( TRITON_INTERPRET=0 "$PY" -m kernels.aot --recorded "$f" --arch "$arch" --jobs "${MILP_PRECOMPILE_JOBS:-6}" \
        > "$tmp" 2>&1
      rc=$?
      grep -E "^(FAILED|TOO MUCH)" "$tmp" | head -n 5 | tee -a "$LOG"
      log "precompile exit code $rc: $(tail -n 1 "$tmp")" ) &
}

quick() {
    local t0=$SECONDS
    setup
    precompile
    # tests/milp runs on the CPU whatever the machine: the runtime's GPU checks are the
    # correctness tests of bench/test_runtime.py below
    rm -f "$OUT/env.txt"  # its lines are in run.log; $OUT returns at most 8 files
    if [ "${MILP_QUICK_TESTS_S:-100}" -gt 0 ]; then  # 0: the tests ran in an earlier call
        T=${MILP_QUICK_TESTS_S:-100} run_tests tests/kernels
    fi
    export MILP_BENCH_REP_MS=${MILP_BENCH_REP_MS:-50}
    # the forward workloads also time each forced path (milp-split/-fused/-fused_t): which one
    # wins at each shape is what the dispatch thresholds in kernels/configs/<gpu>.json need
    MILP_BENCH_PATHS=1 T=${MILP_QUICK_KERNELS_S:-170} bench quick_kernels bench/test_host_overhead.py \
        bench/test_lora_backward.py bench/test_lora_linear.py \
        -k "test_host_us_per or test_launch_host_us or (test_lora_linear and ($QUICK_FWD)) or (test_lora_backward and ($QUICK_BWD))"
    # MILP_QUICK_RUNTIME_K: a -k expression (e.g. decode: the training target was met on the first run)
    T=${MILP_QUICK_RUNTIME_S:-180} bench quick_runtime bench/test_runtime.py \
        ${MILP_QUICK_RUNTIME_K:+-k "$MILP_QUICK_RUNTIME_K"}
    T=${MILP_QUICK_LAYER_S:-80} bench quick_layer bench/test_decoder_layer.py
    # whatever time is left of MILP_QUICK_TOTAL_S goes to the rest of the op grid (issue 4's
    # "every workload"), in the files' order: the shrink and expand op benchmarks first (the first
    # run's grid stage ran out of time before them, after every linear/backward workload)
    local left=$(( ${MILP_QUICK_TOTAL_S:-540} - (SECONDS - t0) ))
    if [ "$left" -ge 40 ]; then
        T=$left bench quick_grid bench/test_lora_shrink.py bench/test_lora_expand.py bench/test_lora_linear.py \
            bench/test_lora_backward.py \
            -k "not ((test_lora_linear and ($QUICK_FWD)) or (test_lora_backward and ($QUICK_BWD)))"
    else
        log "quick: ${left} s left of MILP_QUICK_TOTAL_S, no grid stage"
    fi
    # no report on the device (its markdown and PNGs would pass the 8 files that come back):
    # make it here with python bench/report.py bench/results/gpu/bench_quick_*.json --out bench/results/gpu --readme README.md
    log "quick: $((SECONDS - t0)) s"
}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(all)
for s in "${STAGES[@]}"; do
    case "$s" in
        all) setup; run_tests
             bench decode bench/test_lora_linear.py -k decode
             bench prefill bench/test_lora_linear.py -k prefill
             bench bwd bench/test_lora_backward.py
             bench ops bench/test_lora_shrink.py bench/test_lora_expand.py
             others; report ;;
        quick) quick ;;
        setup) setup ;;
        tests) run_tests ;;
        kernel-tests) T=${MILP_KERNEL_TESTS_S:-$T} run_tests tests/kernels ;;
        precompile) precompile ;;
        profile) # 512 tokens: the step 13-15x the base on the first run; 4096: 2x, where kernels dominate
                 for tok in ${MILP_PROFILE_TOKENS:-512 4096}; do
                     log "bench/profile_step.py: forward + backward at $tok tokens under torch.profiler"
                     timeout -s INT -k 10 120 "$PY" bench/profile_step.py --tokens "$tok" --out "$OUT" 2>&1 \
                         | tail -n 45 | tee -a "$LOG"
                     [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
                 done ;;
        probe) log "bench/probe_split.py (limit ${MILP_PROBE_S:-$T}s)"
               timeout -s INT -k 10 "${MILP_PROBE_S:-$T}" "$PY" bench/probe_split.py --out "$OUT/probe_split.json" \
                   --rep-ms "${MILP_PROBE_REP_MS:-20}" 2>&1 | tail -n 40 | tee -a "$LOG"
               [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
               [ -f "$OUT/probe_split.json" ] && keep "$OUT/probe_split.json" ;;
        decode) bench decode bench/test_lora_linear.py -k decode ;;
        prefill) bench prefill bench/test_lora_linear.py -k prefill ;;
        bwd) bench bwd bench/test_lora_backward.py ;;
        ops) bench ops bench/test_lora_shrink.py bench/test_lora_expand.py ;;
        aot) "$PY" -m kernels.aot --arch 90 --dtype bf16 2>&1 | tee "$OUT/aot.txt" ;;
        autotune) cfg=$("$PY" -c 'import torch; from kernels.tuning import config_path_for as c; print(c(torch.cuda.get_device_name(0)))')
                  log "autotune --quick into $cfg (limit ${T}s)"
                  # merged into the GPU's committed file (its dispatch knobs kept), so the stages after
                  # this one in the same call use the tuned configs; the file comes back in $OUT
                  timeout -s INT -k 30 "$T" "$PY" -m kernels.autotune --dtype bf16 --quick --jobs "${MILP_TUNE_JOBS:-14}" \
                      --out "$cfg" 2>&1 | tail -n 5 | tee -a "$LOG"
                  [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
                  cp "$cfg" "$OUT/"
                  # a later call on this (warm) machine re-sends the working tree, which would put the
                  # committed file back: setup restores the tuned one from here
                  mkdir -p "$TUNED_DIR" && cp "$cfg" "$TUNED_DIR/" ;;
        others) others ;;
        report) report ;;
        *) echo "unknown stage '$s' ($STAGE_NAMES)" >&2  # refused above already
           exit 2 ;;
    esac
done
log "done: stages ${STAGES[*]}, status $STATUS; files in $OUT"
exit $STATUS
