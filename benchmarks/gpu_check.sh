#!/usr/bin/env bash
# GPU check of the efficient SCConv and the input pipeline (see benchmarks/README.md), in steps that fit 10-minute calls.
#
# 1. benchmarks/equivalence.py: the efficient SCConv against the reference on CUDA (every order x gate mode x
#    attention x gamma norm; float32 without TF32, NCHW and channels_last, kept and recomputed; bf16 autocast;
#    eight inductor fullgraph cases, which vary one thing each from a case that failed on an H200). Then
#    compile-check: what compiled training on CUDA checks before its first step (ablate.nn.compile_check),
#    on ResNet-50's SCConvs with channels_last inputs, as training runs them.
# 2. `ablate bench` on CUDA at 224x224, batch 64, bf16 autocast, ResNet-50 and DenseNet-121, eager (baseline,
#    reference, efficient with scconv.recompute auto; one round of 20 steps: a GPU step varies far less than
#    a CPU one).
# 3. Peak memory at the study's batch sizes (ResNet-50 128; DenseNet-121 64 is step 2's run).
# 4. benchmarks/loader.py: images/s of the Food-101 pipeline with CPU (PIL) and GPU (nvJPEG) decoding and of
#    the CIFAR-100 pipeline, per worker count, beside the training images/s, with the end-to-end images/s and
#    GPU utilisation of training fed by each.
# 5. `ablate bench --compile` (baseline, efficient; compile seconds in their own column), ResNet-50 then
#    DenseNet-121, whose compilation is the longest step and so comes last.
# Prints the equivalence table, one table of the bench rows, then the loader table; each step's output stays
# in $BENCH_OUT (default: a new temporary folder) as it prints it, so a call cut short keeps what finished.
# Each step has its own time limit; one that runs out is reported, and what it printed is kept.
#
#     benchmarks/gpu_check.sh [STEP...]      (default: every step, in the order above; about 25 minutes)
#
# STEP: equivalence, compile-check, resnet50-eager, densenet121-eager, resnet50-memory128, loader, resnet50-compile,
# densenet121-compile. On an H200 (2026-12-04) the first four took 3 minutes together (with one inductor case);
# the loader hung, and the two compiled benches did not finish in 2 and 4 minutes: give each compiled bench a
# call of its own (their limits are 5 and 10 minutes).
# Without a visible CUDA device it stops at once with one line. Sets nothing up: uses .venv when present, else
# the python on PATH with this checkout on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ALL_STEPS=(equivalence compile-check resnet50-eager densenet121-eager resnet50-memory128 loader resnet50-compile densenet121-compile)
for name in "$@"; do
    if [[ " ${ALL_STEPS[*]} " != *" $name "* ]]; then
        echo "gpu_check: STEP '$name' is not a step; accepted: ${ALL_STEPS[*]}" >&2
        exit 2
    fi
done

if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif command -v python >/dev/null; then
    PY=python
else
    PY=python3
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device is visible to torch here; run it on a machine with a GPU" >&2
    exit 2
fi
OUT=${BENCH_OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null);" \
    "$(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg); $("$PY" -c 'import torch; print("torch", torch.__version__)')" >&2

run() {  # run NAME SECONDS COMMAND...: stdout to $OUT/NAME as it comes, also when the command fails or runs out
    local name=$1 limit=$2
    shift 2
    echo "[$(date +%T)] $name (limit ${limit}s)" >&2
    timeout "$limit" "$@" >"$OUT/$name"
    local status=$?
    if [ "$status" -ne 0 ]; then
        [ "$status" -eq 124 ] && status="124: over its time limit"
        echo "[$(date +%T)] $name did not finish (exit $status): what it printed is kept" >&2
    fi
}

bench() {  # bench NAME SECONDS ARGS...: one `ablate bench` invocation on CUDA at 224 px with bf16
    local name=$1 limit=$2
    shift 2
    run "$name.json" "$limit" "$PY" -m ablate.cli bench --device cuda --image-size 224 --amp --format json "$@"
}

step() {  # step NAME: one of the steps above, each with its own time limit
    case $1 in
        equivalence) run equivalence.txt 240 "$PY" benchmarks/equivalence.py --device cuda --bf16 --compile 8 ;;
        compile-check) run compile-check.txt 240 "$PY" -m ablate.nn.compile_check --backbone resnet50 --device cuda ;;
        resnet50-eager) bench resnet50-eager 75 --backbone resnet50 --batch-size 64 --steps 20 --warmup 3 --repeats 1 ;;
        densenet121-eager)
            bench densenet121-eager 90 --backbone densenet121 --batch-size 64 --steps 20 --warmup 3 --repeats 1 ;;
        resnet50-memory128) bench resnet50-memory128 45 --backbone resnet50 --batch-size 128 --steps 3 --warmup 2 \
            --repeats 1 --impls baseline,efficient ;;
        loader) run loader.txt 240 "$PY" benchmarks/loader.py --device cuda --amp --batch-size 64 --images 1024 \
            --workers 4 8 16 --decode cpu gpu --datasets food101 cifar100 ;;
        resnet50-compile) bench resnet50-compile 300 --backbone resnet50 --batch-size 64 --steps 10 --warmup 3 \
            --repeats 1 --compile --impls baseline,efficient ;;
        densenet121-compile) bench densenet121-compile 580 --backbone densenet121 --batch-size 64 --steps 10 \
            --warmup 3 --repeats 1 --compile --impls baseline,efficient ;;
    esac
}

for name in "${@:-${ALL_STEPS[@]}}"; do
    step "$name"
done

cat "$OUT/equivalence.txt" 2>/dev/null || echo "the equivalence check did not run"
echo
cat "$OUT/compile-check.txt" 2>/dev/null || echo "the compile check did not run"
echo
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys

from ablate.bench import format_table

names = ["resnet50-eager", "densenet121-eager", "resnet50-memory128", "resnet50-compile", "densenet121-compile"]
rows = []
for name in names:
    path = pathlib.Path(sys.argv[1], f"{name}.json")
    try:
        rows += json.loads(path.read_text())
    except (OSError, ValueError):  # not run, or cut short before it printed its rows
        print(f"{name}: no rows")
print(format_table(rows) if rows else "no bench run finished")
EOF
echo
cat "$OUT/loader.txt" 2>/dev/null || echo "the loader measurement did not run"
echo "JSON rows and the loader table: $OUT" >&2
