#!/usr/bin/env bash
# The six-real-product benchmark of docs/RESULTS.md ("Six real products"): each seed's run learned one product
# at a time with `moleflow learn` (default preset), then evaluated next to a per-product PatchCore, then the
# mean and spread over seeds. Single-threaded, so that the numbers reproduce exactly.
#
#   bash benchmarks/six_products.sh [OUT=runs/six] [SEEDS="0 1 2"] [LEARN_ARGS]     # ../shared beside the repository
#
# LEARN_ARGS are added to each `moleflow learn`, e.g. "--config offline_fine" or "--set loss.tail_weight=0.7".
#
# About 15 min per seed on 2 CPU cores (features cached after the first), plus PatchCore once (~25 min).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/six}
SEEDS=${2:-"0 1 2"}
LEARN_ARGS=${3:-}
S=../shared/datasets
P="hazelnut=$S/hazelnut_toy/hazelnut metal_plate=$S/mpdd_metal_plate/metal_plate elpv_mono=elpv:mono elpv_poly=elpv:poly
   magnetic_tile=$S/magnetic_tile/magnetic_tile bsd_pitting=$S/bsd_pitting/bsd_pitting"
export OMP_NUM_THREADS=1
evals=()
for seed in $SEEDS; do
  # shellcheck disable=SC2086  # $P is a list of NAME=SOURCE words, $LEARN_ARGS a list of options
  moleflow learn "$OUT/run_s$seed" $P --limits 300,400 --eval none --feature-cache "$OUT/cache" --set "train.seed=$seed" $LEARN_ARGS
  # shellcheck disable=SC2086
  python benchmarks/quality_sweep.py --rescore "$OUT/run_s$seed" --out "$OUT/eval_s$seed" --limits 300,400 \
      --shared ../shared --feature-cache "$OUT/cache" --tasks $P
  evals+=("$OUT/eval_s$seed")
done
python benchmarks/seed_summary.py "${evals[@]}" --out "$OUT/seeds"
python benchmarks/unknown_products.py "$OUT/run_s${SEEDS%% *}" --feature-cache "$OUT/cache" --out "$OUT/seeds"
