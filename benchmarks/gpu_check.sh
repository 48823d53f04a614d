#!/usr/bin/env bash
# GPU check of the efficient SCConv and the input pipeline (see benchmarks/README.md): one call, under 10 minutes.
#
# 1. `ablate bench` on CUDA at 224x224, batch 64, bf16 autocast, ResNet-50 and DenseNet-121: eager (baseline,
#    reference, efficient with scconv.recompute auto and size; 2 interleaved rounds), then under torch.compile (baseline, efficient; 1 round, since
#    every run compiles its model afresh; compile seconds in their own column).
# 2. Peak memory at the study's batch sizes (ResNet-50 128; DenseNet-121 64 is step 1's eager run).
# 3. benchmarks/loader.py: images/s of the Food-101 pipeline with CPU (PIL) and GPU (nvJPEG) decoding and of
#    the CIFAR-100 pipeline, per worker count, beside the training images/s, with the end-to-end images/s and
#    GPU utilisation of training fed by each.
# Prints one table of the bench rows, then the loader table; the JSON rows stay in $BENCH_OUT (default: a new
# temporary folder). Each invocation has its own time limit; one that runs out is reported and left out.
# Without a visible CUDA device it stops at once with one line. Sets nothing up: uses .venv when present.
set -uo pipefail
cd "$(dirname "$0")/.."

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
export MLFLOW_DISABLE_TELEMETRY=true

run() {  # run NAME SECONDS COMMAND...: stdout to $OUT/NAME, kept only when the command finished in time
    local name=$1 limit=$2
    shift 2
    echo "[$(date +%T)] $name (limit ${limit}s)" >&2
    timeout "$limit" "$@" >"$OUT/$name.part"
    local status=$?
    if [ "$status" -ne 0 ]; then
        [ "$status" -eq 124 ] && status="124: over its time limit"
        echo "[$(date +%T)] $name did not finish (exit $status): left out" >&2
        rm -f "$OUT/$name.part"
        return
    fi
    mv "$OUT/$name.part" "$OUT/$name"
}

bench() {  # bench NAME SECONDS ARGS...: one `ablate bench` invocation on CUDA at 224 px with bf16
    local name=$1 limit=$2
    shift 2
    run "$name.json" "$limit" "$PY" -m ablate.cli bench --device cuda --image-size 224 --amp --format json "$@"
}

bench resnet50-eager 85 --backbone resnet50 --batch-size 64 --steps 10 --warmup 3 --repeats 2 --recompute auto,size
bench densenet121-eager 85 --backbone densenet121 --batch-size 64 --steps 10 --warmup 3 --repeats 2 \
    --recompute auto,size
bench resnet50-memory128 45 --backbone resnet50 --batch-size 128 --steps 3 --warmup 2 --repeats 1 \
    --impls baseline,efficient
run loader.txt 110 "$PY" benchmarks/loader.py --device cuda --amp --batch-size 64 --images 1024 \
    --workers 4 8 16 --decode cpu gpu --datasets food101 cifar100
bench resnet50-compile 120 --backbone resnet50 --batch-size 64 --steps 10 --warmup 3 --repeats 1 \
    --compile --impls baseline,efficient
bench densenet121-compile 150 --backbone densenet121 --batch-size 64 --steps 10 --warmup 3 --repeats 1 \
    --compile --impls baseline,efficient

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys

from ablate.bench import format_table

names = ["resnet50-eager", "densenet121-eager", "resnet50-memory128", "resnet50-compile", "densenet121-compile"]
rows = [row for name in names if (path := pathlib.Path(sys.argv[1], f"{name}.json")).exists()
        for row in json.loads(path.read_text())]
print(format_table(rows) if rows else "no bench run finished")
EOF
echo
cat "$OUT/loader.txt" 2>/dev/null || echo "the loader measurement did not finish"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
echo "JSON rows and the loader table: $OUT" >&2
