"""Expert parallelism over torch.distributed (NCCL on NVIDIA, RCCL on ROCm, gloo on a CPU).

    shard.py       which routed experts each rank holds (contiguous ranges, uneven allowed)
    expert_moe.py  one rank's routed MoE: its experts' pairs, combined by all-reduce (same batch on
                   every rank) or dispatched by all-to-all (each rank its own tokens)
    group.py       ExpertParallel: process groups, the MoE hook, the plan broadcast (control plane)
    launch.py      spawning the ranks of one host / joining under torchrun; the workers' loop

See docs/expert_parallel.md.
"""

from flashport.distributed.expert_moe import COMBINES, ExpertParallelMoE
from flashport.distributed.shard import ExpertShard

__all__ = ["COMBINES", "ExpertParallelMoE", "ExpertShard"]
