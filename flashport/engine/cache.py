"""CacheManager: the accounting of the V4 state cache (two block groups + state slots). No torch.

Per running sequence with L = num_computed_tokens and block tables of length T (B = block_size,
W = sliding_window):
  - T == len(comp_blocks) == len(window_blocks) and T * B >= L (tables cover computed tokens);
  - comp_blocks[b] is held for every b < T (compressed state grows with context, never released);
  - window_blocks[b] == -1 exactly for b < num_window_released, and after every update
    num_window_released == max(0, L - (W - 1)) // B: blocks entirely before the window are given
    back as the sequence advances (to the free list, or to the prefix cache when hashed);
  - the first num_registered_blocks blocks are full and computed, and were offered to the cache.
A block's hash chains its parent's hash with its token ids, so equal hashes mean equal prefixes
(up to a 64-bit collision of Python's tuple hash, which is accepted within one process).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flashport.engine.block_pool import BlockPool
from flashport.engine.config import CacheConfig
from flashport.engine.request import Request

_ROOT_HASH = 0x5EED  # parent hash of block 0


@dataclass
class PrefixHit:
    comp_blocks: list[int] = field(default_factory=list)  # leading hit blocks, in order
    window_block: int = -1  # window block of the last hit block (the next token's window tail)

    @property
    def num_blocks(self) -> int:
        return len(self.comp_blocks)


_NO_HIT = PrefixHit()


class CacheManager:
    def __init__(self, cache_config: CacheConfig) -> None:
        self.config = cache_config
        self.block_size = cache_config.block_size
        self.sliding_window = cache_config.sliding_window
        self.enable_prefix_caching = cache_config.enable_prefix_caching
        self.comp_pool = BlockPool(cache_config.num_comp_blocks, "comp_blocks")
        self.window_pool = BlockPool(cache_config.num_window_blocks, "window_blocks")
        self.num_state_slots = cache_config.num_state_slots
        self.free_slots: list[int] = list(range(self.num_state_slots - 1, -1, -1))  # a stack
        # Prefix-cache counters (tokens), counted once per admission.
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ---- counters -------------------------------------------------------------------------------

    @property
    def num_free_comp_blocks(self) -> int:  # free + evictable (cached but unreferenced)
        return self.comp_pool.num_available

    @property
    def num_free_window_blocks(self) -> int:
        return self.window_pool.num_available

    @property
    def num_free_state_slots(self) -> int:
        return len(self.free_slots)

    @property
    def comp_usage(self) -> float:  # fraction held by running sequences
        return self.comp_pool.usage

    @property
    def window_usage(self) -> float:
        return self.window_pool.usage

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens if self.num_prefix_query_tokens else 0.0

    def blocks_needed_alone(self, num_computed_tokens: int) -> tuple[int, int]:
        """(comp, window) blocks a lone sequence must be able to hold to compute that many tokens.

        The window group needs at most two blocks at once for one token (its W - 1 predecessors
        lie in the previous block since B >= W - 1); the scheduler shrinks prefill chunks to fit."""
        num_comp = -(-num_computed_tokens // self.block_size)
        return num_comp, min(num_comp, 2 if self.sliding_window > 1 else 1)

    # ---- prefix cache ---------------------------------------------------------------------------

    def _ensure_hashes(self, req: Request, num_blocks: int) -> list[int]:
        hashes, size = req.block_hashes, self.block_size
        parent = hashes[-1] if hashes else _ROOT_HASH
        for b in range(len(hashes), num_blocks):
            parent = hash((parent, req.token_slice(b * size, (b + 1) * size)))
            hashes.append(parent)
        return hashes

    def find_prefix_hit(self, req: Request) -> PrefixHit:
        """Longest run of leading full blocks whose comp blocks are cached and whose last block's
        window block is cached too, leaving at least one known token to compute. No side effects
        (apart from computing the request's block hashes)."""
        if not self.enable_prefix_caching:
            return _NO_HIT
        max_blocks = (req.num_tokens - 1) // self.block_size  # >= 1 token computed -> logits
        if max_blocks == 0:
            return _NO_HIT
        hashes = self._ensure_hashes(req, max_blocks)
        comp_blocks: list[int] = []
        for b in range(max_blocks):
            block = self.comp_pool.lookup(hashes[b])
            if block is None:
                break
            comp_blocks.append(block)
        for num in range(len(comp_blocks), 0, -1):  # longest run whose window tail survives
            window_block = self.window_pool.lookup(hashes[num - 1])
            if window_block is not None:
                return PrefixHit(comp_blocks[:num], window_block)
        return _NO_HIT

    # ---- allocation -----------------------------------------------------------------------------

    def num_fitting_tokens(self, req: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> int:
        """Largest n <= num_new_tokens whose blocks can be had now (0 if not even one token).

        For a request being admitted, pass its `hit`: the hit's cached-but-unreferenced blocks
        are then not counted as available (taking the hit removes them from the LRU)."""
        if hit is not None:
            start = table_len = hit.num_blocks
            start *= self.block_size
            num_comp = self.comp_pool.num_available - sum(
                1 for b in hit.comp_blocks if self.comp_pool.ref_counts[b] == 0)
            num_window = self.window_pool.num_available - (
                1 if hit.num_blocks and self.window_pool.ref_counts[hit.window_block] == 0 else 0)
        else:
            start, table_len = req.num_computed_tokens, len(req.comp_blocks)
            num_comp, num_window = self.comp_pool.num_available, self.window_pool.num_available
        num_available = min(num_comp, num_window)
        end = start + num_new_tokens
        if -(-end // self.block_size) - table_len <= num_available:
            return num_new_tokens
        return max(0, (table_len + num_available) * self.block_size - start)

    def admit(self, req: Request, hit: PrefixHit) -> None:
        """Give a request starting (or resuming) a state slot and the blocks of its prefix hit."""
        assert req.state_slot == -1 and not req.comp_blocks and self.free_slots
        req.state_slot = self.free_slots.pop()
        num_hit = hit.num_blocks
        for block in hit.comp_blocks:
            self.comp_pool.touch(block)
        if num_hit:
            self.window_pool.touch(hit.window_block)
        req.comp_blocks = tuple(hit.comp_blocks)
        req.window_blocks = (-1,) * (num_hit - 1) + (hit.window_block,) if num_hit else ()
        req.num_window_released = max(0, num_hit - 1)
        req.num_registered_blocks = num_hit
        req.num_computed_tokens = req.num_cached_tokens = num_hit * self.block_size
        if self.enable_prefix_caching:
            self.num_prefix_query_tokens += req.num_tokens
            self.num_prefix_hit_tokens += req.num_cached_tokens

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Extend both block tables to cover tokens [0, num_computed_tokens + num_new_tokens)."""
        num_new = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(req.comp_blocks)
        if num_new > 0:
            if num_new > self.comp_pool.num_available or num_new > self.window_pool.num_available:
                raise RuntimeError(f"{req.request_id}: {num_new} blocks do not fit (check num_fitting_tokens)")
            req.comp_blocks += tuple(self.comp_pool.allocate(num_new))
            req.window_blocks += tuple(self.window_pool.allocate(num_new))

    def on_computed(self, req: Request) -> None:
        """After num_computed_tokens advanced: cache newly full blocks, release out-of-window ones.

        Cheap when nothing crossed a block boundary (the common decode step)."""
        num_computed, size = req.num_computed_tokens, self.block_size
        num_full = num_computed // size
        if num_full > req.num_registered_blocks:
            if self.enable_prefix_caching:
                hashes = self._ensure_hashes(req, num_full)
                for b in range(req.num_registered_blocks, num_full):
                    self.comp_pool.register(req.comp_blocks[b], hashes[b])
                    if req.window_blocks[b] != -1:
                        self.window_pool.register(req.window_blocks[b], hashes[b])
            req.num_registered_blocks = num_full
        num_out = (num_computed - self.sliding_window + 1) // size  # negative (no-op) at the start
        if num_out > req.num_window_released:
            window_blocks = list(req.window_blocks)
            for b in range(req.num_window_released, num_out):
                block = window_blocks[b]
                if block != -1:
                    self.window_pool.free(block)
                    window_blocks[b] = -1
            req.window_blocks = tuple(window_blocks)
            req.num_window_released = num_out

    def free(self, req: Request) -> None:
        """Release everything a request holds (finish, abort, preempt). Full computed blocks were
        registered as they filled, so with prefix caching they stay cached (evictable). Tail
        blocks are released first so that they are also evicted first (a prefix's head is the
        part most likely to be shared)."""
        for block in reversed(req.comp_blocks):
            self.comp_pool.free(block)
        for block in reversed(req.window_blocks):
            if block != -1:
                self.window_pool.free(block)
        if req.state_slot != -1:
            self.free_slots.append(req.state_slot)
        req.comp_blocks = ()
        req.window_blocks = ()
        req.state_slot = -1
        req.num_window_released = 0
        req.num_registered_blocks = 0
