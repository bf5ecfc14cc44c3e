#!/usr/bin/env bash
# One device call running several GPU jobs in a row: bash scripts/gpu/run_round.sh ROUND_FILE
#
# ROUND_FILE: one job per line, "name<TAB>timeout_seconds<TAB>command" (command run from the repo
# root with $OUT/name as its output folder, exported as JOB_OUT). Each job's output goes to
# $OUT/name/log.txt (its tail is printed); at the end everything under $OUT is packed into
# $OUT/round.tgz, since only a few files come back from the device machine.
# Needs transformers 5.24 for the oracle checks: wheels in .whl/ (carried), installed to /tmp/site.
set -u
cd "$(dirname "$0")/../.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
while IFS=$'\t' read -r name limit cmd; do
  [ -z "$name" ] && continue
  case "$name" in \#*) continue ;; esac
  export JOB_OUT="$OUT/$name"
  mkdir -p "$JOB_OUT"
  echo "=== $name (limit ${limit}s, start $(date -u +%T))"
  t0=$(date +%s)
  timeout "$limit" bash -c "$cmd" >"$JOB_OUT/log.txt" 2>&1
  rc=$?
  echo "rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$JOB_OUT/log.txt"
  tail -n 25 "$JOB_OUT/log.txt" | cut -c1-300
done <"$1"
cd "$OUT" && tar czf /tmp/round.tgz --exclude=round.tgz . && mv /tmp/round.tgz "$OUT/round.tgz" \
  && find "$OUT" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
ls -la "$OUT"
