"""A pool of cache blocks of one group (compressed or window): free list, ref counts, prefix cache.

Every block is in exactly one of three states:
  free       ref_count 0, no hash, in `free_ids`
  evictable  ref_count 0, has a hash, in `evictable` (LRU order: first = least recently freed)
  held       ref_count > 0 (by one or more running sequences; it may or may not have a hash)
so num_free + num_evictable + num_held == num_blocks. `hash_to_block` maps each hash to the one
block registered under it (held or evictable); a block's contents never change while it has a
hash (it is full and computed), which is what makes sharing it safe.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, name: str = "blocks") -> None:
        self.name = name
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pops 0, 1, 2, ...
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    @property
    def num_available(self) -> int:  # what allocate() can hand out right now
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_held(self) -> int:
        return self.num_blocks - self.num_available

    @property
    def usage(self) -> float:
        return self.num_held / self.num_blocks

    def allocate(self, num: int) -> list[int]:
        """`num` blocks with ref count 1: truly free ones first, then evict least recently used."""
        if num > self.num_available:
            raise RuntimeError(f"{self.name}: {num} blocks asked, {self.num_available} available")
        out: list[int] = []
        for _ in range(num):
            if self.free_ids:
                block = self.free_ids.pop()
            else:
                block, _ = self.evictable.popitem(last=False)
                block_hash = self.block_hashes[block]
                assert block_hash is not None and self.hash_to_block.get(block_hash) == block
                del self.hash_to_block[block_hash]
                self.block_hashes[block] = None
                self.num_evictions += 1
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def free(self, block: int) -> None:
        """Drop one reference; at zero the block goes to the cache (if hashed) or the free list."""
        ref = self.ref_counts[block] - 1
        if ref < 0:
            raise RuntimeError(f"{self.name}: block {block} freed more often than held")
        self.ref_counts[block] = ref
        if ref == 0:
            if self.block_hashes[block] is None:
                self.free_ids.append(block)
            else:
                self.evictable[block] = None  # most recently used end

    def touch(self, block: int) -> None:
        """Take one more reference on a cached block (a prefix hit); it leaves the evictable LRU."""
        if self.ref_counts[block] == 0:
            del self.evictable[block]  # KeyError here = a free (unhashed) block was touched: a bug
        self.ref_counts[block] += 1

    def lookup(self, block_hash: int) -> int | None:
        return self.hash_to_block.get(block_hash)

    def register(self, block: int, block_hash: int) -> bool:
        """Offer a held, full, computed block to the prefix cache under `block_hash`.

        False when that hash already names another block (two sequences computed the same prefix
        at once): this block then stays unhashed and goes to the free list when released."""
        if self.block_hashes[block] is not None or block_hash in self.hash_to_block:
            return False
        assert self.ref_counts[block] > 0
        self.block_hashes[block] = block_hash
        self.hash_to_block[block_hash] = block
        return True

    def check_invariants(self) -> None:
        """O(num_blocks) consistency check (tests only)."""
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "duplicate in free list"
        for block in range(self.num_blocks):
            ref, block_hash = self.ref_counts[block], self.block_hashes[block]
            assert ref >= 0
            if block in free:
                assert ref == 0 and block_hash is None and block not in self.evictable
            elif block in self.evictable:
                assert ref == 0 and block_hash is not None
            else:
                assert ref > 0, f"{self.name}: block {block} is lost (ref 0, neither free nor cached)"
            if block_hash is not None:
                assert self.hash_to_block[block_hash] == block
        assert len(self.hash_to_block) == sum(h is not None for h in self.block_hashes)
