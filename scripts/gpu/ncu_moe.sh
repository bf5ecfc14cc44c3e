#!/usr/bin/env bash
# Nsight Compute on the fused MoE's decode kernels (V4-Flash shapes, N = 64 tokens, FP4 experts), if
# ncu is installed on the device machine: throughput, memory, warp-stall and occupancy sections.
# N >= PREFILL_MIN_TOKENS profiles the prefill form.
# Usage (repo root): bash scripts/gpu/ncu_moe.sh [N] [KEY=VALUE ...]   (decode-table overrides, both kernels)
set -u
N=${1:-64}
shift || true
OVERRIDES="$*"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then
  echo "ncu not found"; ls -d /usr/local/cuda* /opt/nvidia* 2>/dev/null; exit 0
fi
cat > /tmp/moe_once.py <<PY
import sys
sys.path.insert(0, "scripts/gpu")
sys.argv = ["bench_moe"]
import torch
import bench_moe as b
from flashport.kernels import moe as kmoe
from flashport.kernels import moe_gemm
over = dict(kv.split("=") for kv in "$OVERRIDES".split())
over = {k: (v == "True") if v in ("True", "False") else int(v) if v.isdigit() else v for k, v in over.items()}
for table in (moe_gemm.GATE_UP_CONFIGS, moe_gemm.DOWN_CONFIGS):
    table["sm_90"]["decode"] = {**table["sm_90"]["decode"], **over}
print("decode overrides", over)
g = torch.Generator(device=b.DEV).manual_seed(0)
w = b.make_weights(g)
s = b.make_inputs($N, g)[0]
for _ in range(3):
    kmoe.fused_moe_triton(**s, **w, limit=b.LIMIT)  # the form by N, as the engine picks it
torch.cuda.synchronize()
PY
"$NCU" --target-processes all -k regex:_moe_ --launch-skip 3 --launch-count 2 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
  --section WarpStateStats --section Occupancy --section SchedulerStats --section LaunchStats python3 /tmp/moe_once.py
