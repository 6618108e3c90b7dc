#!/usr/bin/env bash
# Reproduce docs/RESULTS.md from a clean checkout: every method on standard order 1, the five
# main methods on orders 2 and 3 and with seeds 1 and 2 on order 1; smollm2-135m, 200 training
# and 100 test examples per task. Hours of CPU: every run is resumable, so re-running the
# script continues where it stopped. Small outputs land in results/ (adapters are not kept).
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
PY=.venv/bin/python
COMMON=(--benchmark standard --model smollm2-135m --train-per-task 200 --test-per-task 100 --quiet)
MAIN=seqlora,olora,gorp,deal,mtl
ALL=zero-shot,seqlora,inclora,olora,gorp,deal,deal-code,seqft,replay,ewc,lwf,mtl,pertask

$PY -m dealcl compare "${COMMON[@]}" --orders 1 --methods "$MAIN" --output results/order1
$PY -m dealcl compare "${COMMON[@]}" --orders 1 --methods "$ALL" --output results/order1
$PY -m dealcl compare "${COMMON[@]}" --orders 2,3 --methods "$MAIN" --output results/orders23
for seed in 1 2; do
  $PY -m dealcl compare "${COMMON[@]}" --orders 1 --methods "$MAIN" --seed "$seed" --output "results/order1-seed$seed"
done
find results -type d -name adapters -prune -exec rm -rf {} +
$PY bench/render_results.py results --into docs/RESULTS.md
echo "docs/RESULTS.md regenerated"
