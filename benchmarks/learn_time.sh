#!/usr/bin/env bash
# Wall time of learning one 300-image product, as a user adds one to a run (docs/PERFORMANCE.md,
# "Learning a 300-image product"): a run with hazelnut learned first (the shared base), then ELPV poly
# given 300 training images (240 trained on, 60 held out to calibrate); image checks, backbone
# extraction, training, calibration and the commit included, no feature cache, default thread count.
#
#   bash benchmarks/learn_time.sh [OUT=runs/learn_time] ["NAME:--set k=v ..." ...]
#
# Without variants it times the default preset in fp32 and in bf16, and the default with every patch
# trained on (train.patch_fraction=1, the default before it became 0.5). Needs ../shared and the
# elpv-dataset package (the [demo] extra). Prints one Markdown row per variant.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/learn_time}
shift || true
S=../shared/datasets
if [ $# -eq 0 ]; then
  set -- "fp32:" "bf16:--set train.precision=bf16 --set scoring.precision=bf16" "fp32_all_patches:--set train.patch_fraction=1"
fi
echo "| variant | wall time | training | final loss | load average before |"
echo "|---|---|---|---|---|"
for variant in "$@"; do
  name=${variant%%:*}
  sets=${variant#*:}
  run="$OUT/$name"
  rm -rf "$run"
  # shellcheck disable=SC2086  # $sets is a list of --set words
  mkdir -p "$OUT"
  moleflow learn "$run" hazelnut=$S/hazelnut_toy/hazelnut --eval none --no-progress -q $sets >"$OUT/$name.log" 2>&1
  load=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s%N)
  moleflow learn "$run" elpv_poly=elpv:poly --limits 300,50 --eval none --no-progress -q >>"$OUT/$name.log" 2>&1
  wall=$(( ($(date +%s%N) - start) / 1000000 ))  # ms
  line=$(grep "task 'elpv_poly' learned in" "$run/train.log" | tail -1)
  train=$(echo "$line" | sed -E 's/.*learned in ([0-9.]+)s.*/\1/')
  loss=$(echo "$line" | sed -E 's/.*final loss ([0-9.]+).*/\1/')
  printf '| %s | %d.%d s | %s s | %s | %s |\n' "$name" $((wall / 1000)) $(((wall % 1000) / 100)) "$train" "$loss" "$load"
done
