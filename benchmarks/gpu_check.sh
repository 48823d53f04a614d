#!/usr/bin/env bash
# GPU check of the efficient SCConv (see benchmarks/README.md), one prepared run of under 8 minutes.
#
# `ablate bench` on CUDA at 224x224 with the study's batch sizes (ResNet-50: 128, DenseNet-121: 64)
# and bf16 autocast, first eager (baseline, reference, efficient; 2 interleaved rounds), then under
# torch.compile (baseline and efficient; 1 round, since every run compiles its model afresh).
# Prints one table; the JSON rows stay in $BENCH_OUT (default: a new temporary folder).
# Each invocation has its own time limit so that the whole stays under 8 minutes; one that runs
# out is reported and left out of the table. Sets nothing up: uses .venv when present.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif command -v python >/dev/null; then
    PY=python
else
    PY=python3
fi
OUT=${BENCH_OUT:-$(mktemp -d)}
mkdir -p "$OUT"

bench() {  # bench NAME SECONDS ARGS...: one `ablate bench` invocation, JSON to $OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    echo "[$(date +%T)] $name (limit ${limit}s)" >&2
    timeout "$limit" "$PY" -m ablate.cli bench --device cuda --image-size 224 --amp --format json "$@" \
        >"$OUT/$name.json.part"
    local status=$?
    if [ "$status" -ne 0 ]; then
        [ "$status" -eq 124 ] && status="124: over its time limit"
        echo "[$(date +%T)] $name did not finish (exit $status): left out of the table" >&2
        rm -f "$OUT/$name.json.part"
        return
    fi
    mv "$OUT/$name.json.part" "$OUT/$name.json"
}

bench resnet50-eager 80 --backbone resnet50 --batch-size 128 --steps 10 --warmup 3 --repeats 2
bench densenet121-eager 80 --backbone densenet121 --batch-size 64 --steps 10 --warmup 3 --repeats 2
bench resnet50-compile 150 --backbone resnet50 --batch-size 128 --steps 10 --warmup 3 --repeats 1 \
    --compile --impls baseline,efficient
bench densenet121-compile 150 --backbone densenet121 --batch-size 64 --steps 10 --warmup 3 --repeats 1 \
    --compile --impls baseline,efficient

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys

from ablate.bench import format_table

names = ["resnet50-eager", "densenet121-eager", "resnet50-compile", "densenet121-compile"]
rows = [row for name in names if (path := pathlib.Path(sys.argv[1], f"{name}.json")).exists()
        for row in json.loads(path.read_text())]
print(format_table(rows) if rows else "no run finished")
EOF
echo "JSON rows: $OUT" >&2
