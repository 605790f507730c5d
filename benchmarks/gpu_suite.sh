#!/usr/bin/env bash
# The GPU suite: ONE command on the GPU machine, from the repository root.
#
#   bash benchmarks/gpu_suite.sh
#
# (device tool: carry [".whl"] and, if you have it, ".fixtures"; results land in $OUT.)
# Steps, each under its own timeout, inside a total budget (default 540 s, under the tool's
# 10-minute limit):
#   pytest     pytest -m gpu tests/ as 5 processes side by side (GEMMA4_JAX_FIXTURES=.fixtures),
#              and tests/test_legacy_quants.py (whole model, every kernel mode) as two more
#   fixtures   benchmarks/check_fixtures_gpu.py --out $OUT/check_fixtures_gpu.json (if present)
#   qmatmul    benchmarks/bench_qmatmul.py --out $OUT/bench_qmatmul.json     (if the file exists)
#   attention  benchmarks/bench_attention.py --out $OUT/bench_attention.json (if the file exists)
#   e2e        benchmarks/bench_e2e.py with whatever budget is left
# Environment knobs:
#   SUITE_STEPS       comma list of the steps above (default: all five)
#   SUITE_BUDGET_S    total seconds (default 540)
#   PYTEST_TIMEOUT_S  (default 400)   FIXTURES_TIMEOUT_S (390; every fixture, `auto` mode)
#   QMATMUL_TIMEOUT_S (default 90)    ATTENTION_TIMEOUT_S (90)
#   PYTEST_ARGS       extra pytest arguments (e.g. "-k qmatmul")
#   FIXTURES_ARGS / QMATMUL_ARGS / ATTENTION_ARGS   extra arguments for those scripts
#   E2E_ARGS          extra bench_e2e.py arguments, e.g. "--only decode,prefill,peer" or
#                     "--extra 31b:q4_k_m,26b-a4b:q4_k_m"
# Files under $OUT (7; the device tool returns at most 8): suite_summary.md, pytest_gpu.log,
# bench_logs.txt (every script's output and bench_e2e's worker logs), check_fixtures_gpu.json,
# bench_qmatmul.json, bench_attention.json, bench_e2e.json.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-540}
STEPS=${SUITE_STEPS:-pytest,fixtures,qmatmul,attention,e2e}
SUMMARY=$OUT/suite_summary.md
LOGS=$OUT/bench_logs.txt
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - T0))); }
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
note() { echo "$*" | tee -a "$SUMMARY"; }
# run NAME TIMEOUT LOGFILE CMD...: one step under `timeout`, its status into the summary
run() {
    local name=$1 tmo=$2 log=$3
    shift 3
    local avail
    avail=$(($(left) - 10))
    if [ "$avail" -lt 20 ]; then
        note "| $name | skipped: budget | 0 |"
        return
    fi
    [ "$tmo" -gt "$avail" ] && tmo=$avail
    echo "===== $name: $* (timeout ${tmo}s)" >>"$log"
    local t=$(date +%s) rc
    timeout -k 10 "$tmo" "$@" >>"$log" 2>&1
    rc=$?
    local status="ok"
    [ $rc -eq 124 ] && status="TIMEOUT after ${tmo}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="exit $rc"
    note "| $name | $status | $(($(date +%s) - t)) |"
}

: >"$SUMMARY"
: >"$LOGS"
note "# gemma4-jax GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
note ""
note '```'
{
    # The device tool copies the working tree but may keep an older .git: SUITE_COMMIT (set by
    # the caller from its own checkout) names the code when given.
    echo "commit: ${SUITE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files (device .git)}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
} | tee -a "$SUMMARY"

# -- the carried wheels (gguf is not installed on the GPU machine)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        >>"$LOGS" 2>&1 || echo "wheel install failed (see bench_logs.txt)" | tee -a "$SUMMARY"
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-}
if [ -d .fixtures ]; then
    export GEMMA4_JAX_FIXTURES=$ROOT/.fixtures
fi
python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib.metadata as md, sys
vs = []
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "torch", "transformers", "triton", "gguf", "numpy"):
    try:
        vs.append(f"{p} {md.version(p)}")
    except Exception:
        vs.append(f"{p} -")
print("python", sys.version.split()[0], "|", ", ".join(vs))
EOF
note "fixtures: ${GEMMA4_JAX_FIXTURES:-none}; budget ${BUDGET}s; steps $STEPS"
note '```'
note ""
note "| step | status | seconds |"
note "|---|---|---|"

# Triton compiles are CPU-bound and serial inside one process: the GPU tests run as seven
# pytest processes side by side (and the fixtures one process each), which fits them into one
# call (measured 2026-11-24: ~6.5 min for all four groups and every fixture in parallel).
gpu_tests() {
    local P="python3 -m pytest -v -p no:cacheprovider -m gpu" rc=0 pid
    local pids=()
    export XLA_PYTHON_CLIENT_PREALLOCATE=false # several processes share the GPU
    # shellcheck disable=SC2086
    $P tests/test_kernels_attention.py -k "FlashAttentionGpu" ${PYTEST_ARGS:-} \
        >"$OUT/pytest_gpu_1.log" 2>&1 &
    pids+=($!)
    # shellcheck disable=SC2086
    $P tests/test_kernels_attention.py -k "DecodeAttentionGpu or DecodeAttentionStackedGpu or QKNormRopeGpu or TritonLowering" \
        ${PYTEST_ARGS:-} >"$OUT/pytest_gpu_2.log" 2>&1 &
    pids+=($!)
    # shellcheck disable=SC2086
    $P tests/test_kernels_qmatmul.py -k "decode or grouped or ragged or 26b" ${PYTEST_ARGS:-} \
        >"$OUT/pytest_gpu_3.log" 2>&1 &
    pids+=($!)
    # shellcheck disable=SC2086
    $P tests/ -k "not test_kernels_attention and not (test_kernels_qmatmul and (decode or grouped or ragged or 26b or e4b_shapes))" \
        ${PYTEST_ARGS:-} >"$OUT/pytest_gpu_4.log" 2>&1 &
    pids+=($!)
    # The 120 E4B-shape cases (8 formats) apart: with them, the process above did not finish
    # in 500 s (run z).
    # shellcheck disable=SC2086
    $P tests/test_kernels_qmatmul.py -k "e4b_shapes" ${PYTEST_ARGS:-} \
        >"$OUT/pytest_gpu_5.log" 2>&1 &
    pids+=($!)
    # A model-level test that is not GPU-only but must also pass compiled (the llama-quantize
    # fallback types through the whole model in every kernel mode), in a process of its own: its
    # whole-model compiles took over 5 min on the H100 in run y (12 of its 13 cases, in two
    # calls) and one process did not finish its 15 in 500 s in run z: two processes, so the
    # step may still need PYTEST_TIMEOUT_S above the default.
    local L="python3 -m pytest -v -p no:cacheprovider tests/test_legacy_quants.py"
    $L -k "Q5_0 or batched or in_place" >"$OUT/pytest_gpu_6.log" 2>&1 &
    pids+=($!)
    $L -k "not (Q5_0 or batched or in_place)" >"$OUT/pytest_gpu_7.log" 2>&1 &
    pids+=($!)
    # Each process's own exit status: a crashed pytest (abort, OOM kill) fails the step even
    # though its log holds no FAILED line.
    for pid in "${pids[@]}"; do
        wait "$pid" || rc=1
    done
    return $rc
}
if want pytest; then
    export -f gpu_tests
    export OUT PYTEST_ARGS
    rm -f "$OUT"/pytest_gpu_[1-7].log
    run "pytest -m gpu (7 processes)" "${PYTEST_TIMEOUT_S:-400}" "$LOGS" bash -c gpu_tests
    # Merged here, not inside gpu_tests: a timeout kills that shell before it could.
    cat "$OUT"/pytest_gpu_[1-7].log >"$OUT/pytest_gpu.log" 2>/dev/null
    rm -f "$OUT"/pytest_gpu_[1-7].log
    note "| pytest -m gpu: $(grep -cE '::.* PASSED' "$OUT/pytest_gpu.log") passed, $(grep -cE '::.* FAILED' "$OUT/pytest_gpu.log") failed, $(grep -cE '::.* ERROR' "$OUT/pytest_gpu.log") errors | | |"
fi
if want fixtures; then
    if [ -f benchmarks/check_fixtures_gpu.py ]; then
        # shellcheck disable=SC2086
        run "check_fixtures_gpu" "${FIXTURES_TIMEOUT_S:-390}" "$LOGS" \
            python3 benchmarks/check_fixtures_gpu.py --modes auto --jobs 7 --timeout 380 \
            --out "$OUT/check_fixtures_gpu.json" ${FIXTURES_ARGS:-}
    else
        note "| check_fixtures_gpu | absent | 0 |"
    fi
fi
if want qmatmul; then
    if [ -f benchmarks/bench_qmatmul.py ]; then
        # shellcheck disable=SC2086
        run "bench_qmatmul" "${QMATMUL_TIMEOUT_S:-90}" "$LOGS" \
            python3 benchmarks/bench_qmatmul.py --out "$OUT/bench_qmatmul.json" ${QMATMUL_ARGS:-}
    else
        note "| bench_qmatmul | absent (benchmarks/bench_qmatmul.py) | 0 |"
    fi
fi
if want attention; then
    if [ -f benchmarks/bench_attention.py ]; then
        # shellcheck disable=SC2086
        run "bench_attention" "${ATTENTION_TIMEOUT_S:-90}" "$LOGS" \
            python3 benchmarks/bench_attention.py --out "$OUT/bench_attention.json" ${ATTENTION_ARGS:-}
    else
        note "| bench_attention | absent (benchmarks/bench_attention.py) | 0 |"
    fi
fi
if want e2e; then
    E2E_BUDGET=$(($(left) - 25))
    if [ "$E2E_BUDGET" -ge 60 ]; then
        # shellcheck disable=SC2086
        run "bench_e2e (budget ${E2E_BUDGET}s)" $((E2E_BUDGET + 20)) "$LOGS" \
            python3 benchmarks/bench_e2e.py --budget-s "$E2E_BUDGET" \
            --out "$OUT/bench_e2e.json" --log "$LOGS" ${E2E_ARGS:-}
    else
        note "| bench_e2e | skipped: ${E2E_BUDGET}s left | 0 |"
    fi
fi

# -- summary: pytest's last line, the benchmarks' tables
{
    echo ""
    if [ -f "$OUT/pytest_gpu.log" ]; then
        echo "pytest, each process's last line:"
        grep -E '^=+ .*(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$OUT/pytest_gpu.log"
        grep -E '^(FAILED|ERROR) ' "$OUT/pytest_gpu.log" | head -20
    fi
    if [ -f "$OUT/bench_e2e.json" ]; then
        echo ""
        python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['markdown'])" \
            "$OUT/bench_e2e.json" 2>/dev/null || echo "(bench_e2e.json unreadable)"
    fi
    echo ""
    echo "total $(($(date +%s) - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
} | tee -a "$SUMMARY"
# the benchmarks' own stdout ends with their tables: show the last lines too
tail -5 "$LOGS"
