#!/usr/bin/env bash
# Every registered method end to end through the CLI: on the embedded smollm2-135m (2 tasks,
# tiny caps) and on the tiny random T5. Prints one line per run; fails on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/smoke}
METHODS=$($PY -c "from dealcl.methods import list_methods; print(' '.join(m.name for m in list_methods()))")
for model in smollm2-135m tiny-t5; do
  for method in $METHODS; do
    start=$(date +%s)
    $PY -m dealcl run --tasks agnews,SST-2 --method "$method" --model "$model" --train-per-task 16 \
        --test-per-task 8 --output "$OUT/$model-$method" --quiet > /dev/null
    echo "$model $method: ok in $(( $(date +%s) - start )) s, AA $($PY -c "import json; print(json.load(open('$OUT/$model-$method/results.json'))['average_accuracy'])")"
  done
done
