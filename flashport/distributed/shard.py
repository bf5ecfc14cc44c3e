"""Which routed experts each rank of an expert-parallel group holds (no torch here).

Experts are split into contiguous ranges, the first `E % W` ranks holding one more: 256 experts
over 8 ranks = 32 each; 8 over 3 = 3, 3, 2. Contiguous ranges keep the global -> local id map a
subtraction and let the loader skip every other rank's tensors by index.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashport.errors import FlashportError


@dataclass(frozen=True)
class ExpertShard:
    rank: int
    world_size: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise FlashportError(f"ExpertShard.world_size = {self.world_size}: must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise FlashportError(f"ExpertShard.rank = {self.rank}: must be in [0, {self.world_size})")
        if self.num_experts < self.world_size:
            raise FlashportError(f"expert parallel size {self.world_size} is larger than the model's "
                                 f"{self.num_experts} routed experts (n_routed_experts): every rank needs one")

    def range_of(self, rank: int) -> range:
        """Global expert ids held by `rank`."""
        base, extra = divmod(self.num_experts, self.world_size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    @property
    def local(self) -> range:
        return self.range_of(self.rank)

    @property
    def num_local(self) -> int:
        return len(self.local)

    def owner(self, expert: int) -> int:
        """The rank holding global expert id `expert`."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} outside [0, {self.num_experts})")
        base, extra = divmod(self.num_experts, self.world_size)
        cut = extra * (base + 1)  # experts of the ranks holding one more
        return expert // (base + 1) if expert < cut else extra + (expert - cut) // base
