#!/usr/bin/env bash
# Reproduce docs/RESULTS.md from a clean checkout: a learning-rate sweep of every method that
# trains, every method on standard order 1 at its swept rate, the five main methods on orders
# 2 and 3 and with seeds 1 and 2 on order 1; smollm2-135m (the embedded Q4_1 GGUF, dequantized
# to fp32), 200 training and 100 test examples per task. Hours of CPU: every run is resumable,
# so re-running the script continues where it stopped, and finished runs (committed under
# results/) are re-read, not retrained. Adapters are not kept.
#
# `bench/results.sh sweeps|order1|orders23|seeds|long|render` runs one step; no argument runs all.
# `bench/results.sh new METHOD` runs the newer baselines (inflora, gainlora, nlora, osf) one at a
# time: a 3-rate sweep, then order 1 at the chosen rate into results/order1-new (several METHODs
# may run side by side); `bench/results.sh new-table` then re-reads them into one comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
# PY=path/to/python uses that environment as it is (no `make setup`).
[[ -n ${PY:-} ]] || make setup
PY=${PY:-.venv/bin/python}
COMMON=(--benchmark standard --model smollm2-135m --train-per-task 200 --test-per-task 100 --quiet)
MAIN=seqlora,olora,gorp,deal,mtl
ALL=zero-shot,seqlora,inclora,olora,gorp,deal,deal-code,seqft,replay,ewc,lwf,mtl,pertask
SWEPT="inclora ewc lwf replay pertask deal-code seqft seqlora olora gorp deal mtl"
step=${1:-all}
NEW=inflora,gainlora,nlora,osf

# Adapters of the folder a step wrote (only there: another step may be training side by side).
prune() { find "$1" -type d -name adapters -prune -exec rm -rf {} +; }

# 1. Learning rates on examples held out of the first two tasks' training files (never the
#    test set). Adapter methods: 1e-4 .. 2e-3; full fine-tuning ten times lower. The rates
#    chosen here are the methods' smollm2-135m defaults (`tuned_lrs` in their classes).
if [[ $step == all || $step == sweeps ]]; then
  for method in $SWEPT; do
    rates=1e-4,5e-4,1e-3,2e-3
    [[ $method == seqft ]] && rates=1e-5,5e-5,1e-4,2e-4
    $PY -m dealcl sweep --tasks dbpedia,amazon --method "$method" --model smollm2-135m --train-per-task 200 \
        --val-per-task 100 --lrs "$rates" --quiet --output "results/sweep/$method"
    prune "results/sweep/$method"
  done
fi
# 2. The table: every method at the rate its own sweep chose.
if [[ $step == all || $step == order1 ]]; then
  $PY -m dealcl compare "${COMMON[@]}" --orders 1 --methods "$ALL" --lrs-from results/sweep --output results/order1
  prune "results/order1"
fi
# 3. The main methods on the other orders and seeds.
if [[ $step == all || $step == orders23 ]]; then
  $PY -m dealcl compare "${COMMON[@]}" --orders 2,3 --methods "$MAIN" --lrs-from results/sweep --output results/orders23
  prune "results/orders23"
fi
if [[ $step == all || $step == seeds ]]; then
  for seed in 1 2; do
    $PY -m dealcl compare "${COMMON[@]}" --orders 1 --methods "$MAIN" --lrs-from results/sweep --seed "$seed" \
        --output "results/order1-seed$seed"
    prune "results/order1-seed$seed"
  done
fi
# 4. The newer baselines. Their grid has three rates: 1e-4 never won for a LoRA method in the
#    4-rate sweeps (inclora 23 AA against 54-58 at the others), and the hours are the CPU's.
#    OSF trains a full-size SVD reparametrisation of every projection, so its grid is lower.
if [[ $step == new ]]; then
  method=${2:?usage: bench/results.sh new METHOD}
  rates=5e-4,1e-3,2e-3
  [[ $method == osf ]] && rates=5e-6,2e-5,1e-4
  $PY -m dealcl sweep --tasks dbpedia,amazon --method "$method" --model smollm2-135m --train-per-task 200 \
      --val-per-task 100 --lrs "$rates" --quiet --output "results/sweep/$method"
  prune "results/sweep/$method"
  lr=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_lr'])" "results/sweep/$method/sweep.json")
  $PY -m dealcl run "${COMMON[@]}" --order 1 --method "$method" --lr "$lr" --output "results/order1-new/order1-$method"
  prune "results/order1-new/order1-$method"
fi
if [[ $step == new-table ]]; then
  $PY -m dealcl compare "${COMMON[@]}" --orders 1 --methods "$NEW" --lrs-from results/sweep --output results/order1-new
fi
# 5. The long benchmark (15 tasks, order 6 = O-LoRA's and DEAL's long scripts) for the main methods,
#    each at the rate its standard-benchmark sweep chose (dbpedia and amazon, both in the long
#    sequence: a separate 15-task sweep per method would cost more than the table). A 15-task run
#    evaluates 120 task test sets plus the reference stage, so the caps are small: 64 training and
#    32 test examples per task, one run about half an hour on one core. `long METHOD` runs one
#    method (several may run side by side); `long` alone runs the five, then the comparison.
LONG=(--benchmark long --model smollm2-135m --train-per-task 64 --test-per-task 32 --quiet)
if [[ $step == long && -n ${2:-} ]]; then
  lr=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_lr'])" "results/sweep/$2/sweep.json")
  $PY -m dealcl run "${LONG[@]}" --order 6 --method "$2" --lr "$lr" --output "results/long-order6/order6-$2"
  prune "results/long-order6/order6-$2"
elif [[ $step == all || $step == long ]]; then
  $PY -m dealcl compare "${LONG[@]}" --orders 6 --methods "$MAIN" --lrs-from results/sweep --output results/long-order6
  prune "results/long-order6"
fi
if [[ $step == all || $step == render ]]; then
  $PY bench/render_results.py results --into docs/RESULTS.md
  echo "docs/RESULTS.md regenerated"
fi
