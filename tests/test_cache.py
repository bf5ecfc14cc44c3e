"""BlockPool and CacheManager accounting (pure Python: no torch here)."""

import pytest

from flashport.engine.block_pool import BlockPool
from flashport.engine.cache import CacheManager
from flashport.engine.config import CacheConfig
from flashport.engine.request import Request

B, W = 8, 4  # block_size, sliding_window


def make_cache(num_comp=16, num_window=16, num_slots=4, prefix=True, block_size=B, window=W) -> CacheManager:
    return CacheManager(CacheConfig(block_size=block_size, num_comp_blocks=num_comp, num_window_blocks=num_window,
                                    num_state_slots=num_slots, sliding_window=window,
                                    enable_prefix_caching=prefix))


def run_prompt(cm: CacheManager, req: Request, chunk: int = 1000) -> None:
    """Admit (with its prefix hit) and compute the whole prompt in chunks, like the scheduler."""
    cm.admit(req, cm.find_prefix_hit(req))
    while req.num_computed_tokens < req.num_tokens:
        num = min(chunk, req.num_tokens - req.num_computed_tokens)
        cm.allocate(req, num)
        req.num_computed_tokens += num
        cm.on_computed(req)
    check(cm)


def check(cm: CacheManager) -> None:
    cm.comp_pool.check_invariants()
    cm.window_pool.check_invariants()


# ---- BlockPool ---------------------------------------------------------------------------------

def test_pool_allocate_free_refcount():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert (pool.num_free, pool.num_held, pool.usage) == (2, 2, 0.5)
    pool.free(0)
    assert pool.num_free == 3 and pool.ref_counts[0] == 0
    assert pool.allocate(1) == [0]  # the free list is a stack: the block just freed comes back
    with pytest.raises(RuntimeError, match="asked"):
        pool.allocate(3)
    assert pool.register(1, 111)
    pool.touch(1)  # a second sequence shares block 1
    assert pool.ref_counts[1] == 2
    pool.free(1)
    assert pool.num_evictable == 0 and pool.ref_counts[1] == 1  # still held by the first
    pool.free(1)
    assert pool.num_evictable == 1 and pool.lookup(111) == 1  # unreferenced: cached, not free
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(1)
    pool.check_invariants()


def test_pool_lru_eviction_order_and_free_first():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for block in blocks:
        pool.register(block, 100 + block)
    for block in (2, 0, 3):  # freed in this order: LRU = 2, 0, 3
        pool.free(block)
    pool.touch(0)  # a hit on 0 takes it out of the LRU; freeing it again makes it most recent
    pool.free(0)
    pool.free(1)  # LRU = 2, 3, 0, 1
    assert list(pool.evictable) == [2, 3, 0, 1]
    assert pool.allocate(1) == [2]
    assert pool.lookup(102) is None and pool.block_hashes[2] is None and pool.num_evictions == 1
    pool.free(2)  # unhashed now: back to the truly free list
    assert pool.allocate(1) == [2]  # a truly free block is taken before evicting a cached one
    assert pool.allocate(2) == [3, 0]
    assert pool.lookup(101) == 1 and pool.lookup(100) is None
    pool.check_invariants()


def test_pool_register_duplicate_hash_stays_unhashed():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.register(a, 7)
    assert not pool.register(b, 7)  # a concurrent duplicate of the same prefix
    pool.free(b)
    assert pool.num_free == 2 and pool.num_evictable == 0
    pool.free(a)
    assert pool.num_evictable == 1
    pool.check_invariants()


# ---- CacheManager --------------------------------------------------------------------------------

def test_prefix_hit_length_and_counters():
    cm = make_cache()
    prompt = list(range(3 * B + 5))  # 3 full blocks + 5
    a = Request("a", prompt, max_tokens=4)
    run_prompt(cm, a, chunk=5)
    assert a.num_registered_blocks == 3 and cm.num_prefix_hit_tokens == 0
    assert cm.num_prefix_query_tokens == len(prompt)

    b = Request("b", prompt[: 2 * B] + [99] * 7, max_tokens=4)  # shares 2 blocks, differs after
    hit = cm.find_prefix_hit(b)
    assert hit.num_blocks == 2 and hit.comp_blocks == list(a.comp_blocks[:2])
    # a (at 29 tokens) released window blocks 0..2 (out of its window): they are cached, ref 0.
    assert a.window_blocks[:3] == (-1, -1, -1) and cm.window_pool.num_evictable == 3
    w1 = cm.window_pool.lookup(a.block_hashes[1])
    assert hit.window_block == w1 is not None
    cm.admit(b, hit)
    assert b.num_computed_tokens == b.num_cached_tokens == 2 * B
    assert b.comp_blocks == a.comp_blocks[:2] and b.window_blocks == (-1, w1)
    assert cm.window_pool.ref_counts[w1] == 1 and cm.window_pool.num_evictable == 2
    assert cm.comp_pool.ref_counts[a.comp_blocks[0]] == 2  # shared
    assert cm.num_prefix_hit_tokens == 2 * B
    assert cm.prefix_hit_rate == pytest.approx(2 * B / (len(prompt) + b.num_tokens))
    check(cm)

    cm.free(a)
    cm.free(b)
    check(cm)
    assert cm.comp_pool.num_held == 0 and cm.window_pool.num_held == 0 and cm.num_free_state_slots == 4
    assert cm.comp_pool.num_evictable == 3  # a's three full blocks stay cached (b's were shared)


def test_fully_cached_prompt_is_capped_so_one_token_is_computed():
    cm = make_cache()
    prompt = list(range(2 * B))
    a = Request("a", prompt, max_tokens=4)
    run_prompt(cm, a)
    cm.free(a)
    same = Request("same", list(prompt), max_tokens=4)
    hit = cm.find_prefix_hit(same)
    assert hit.num_blocks == 1  # floor((2B - 1) / B): the last block is recomputed for logits
    longer = Request("longer", prompt + [5], max_tokens=4)
    assert cm.find_prefix_hit(longer).num_blocks == 2  # one token left to compute
    short = Request("short", prompt[:B], max_tokens=4)
    assert cm.find_prefix_hit(short).num_blocks == 0
    check(cm)


def test_hit_requires_the_window_block_of_the_last_hit_block():
    cm = make_cache(num_window=8)
    prompt = list(range(3 * B + 1))
    a = Request("a", prompt, max_tokens=4)
    run_prompt(cm, a, chunk=3)
    cm.free(a)
    w = [cm.window_pool.lookup(h) for h in a.block_hashes[:3]]
    assert None not in w and cm.window_pool.num_evictable == 3
    probe = Request("probe", list(prompt), max_tokens=4)
    assert cm.find_prefix_hit(probe).num_blocks == 3

    # Evict exactly the window block of block 2: pin the other two, exhaust the pool, unpin.
    cm.window_pool.touch(w[0])
    cm.window_pool.touch(w[1])
    taken = cm.window_pool.allocate(cm.window_pool.num_available)
    assert w[2] in taken and cm.window_pool.lookup(a.block_hashes[2]) is None
    hit = cm.find_prefix_hit(probe)
    assert hit.num_blocks == 2 and hit.window_block == w[1]  # comp block 2 is cached but unusable
    assert cm.comp_pool.lookup(a.block_hashes[2]) is not None

    for block in [w[0], w[1], *taken]:
        cm.window_pool.free(block)
    taken = cm.window_pool.allocate(cm.window_pool.num_available)  # evicts every window block
    assert cm.find_prefix_hit(probe).num_blocks == 0  # comp blocks alone are not a hit
    for block in taken:
        cm.window_pool.free(block)
    check(cm)


def test_window_blocks_released_as_the_sequence_advances():
    cm = make_cache(num_comp=8, num_window=8, prefix=False)
    req = Request("r", [1], max_tokens=100)
    cm.admit(req, cm.find_prefix_hit(req))
    seen = []
    for pos in range(4 * B):  # decode one token at a time: computing token pos
        cm.allocate(req, 1)
        req.prompt_token_ids.append(pos)  # the token count only matters for hashing (off here)
        req.num_computed_tokens += 1
        cm.on_computed(req)
        # Held window blocks cover [max(0, L - (W - 1)), L); before that: -1.
        num_computed = req.num_computed_tokens
        first_needed = max(0, num_computed - (W - 1)) // B
        assert all(b == -1 for b in req.window_blocks[:first_needed])
        assert all(b != -1 for b in req.window_blocks[first_needed:])
        assert len(req.comp_blocks) == len(req.window_blocks) == -(-num_computed // B)
        seen.append(cm.window_pool.num_held)
        check(cm)
    assert max(seen) == 2 and cm.comp_pool.num_held == 4  # window stays bounded, compressed grows
    # Exactly at L = B + W - 1 block 0 leaves the window.
    assert seen[B + W - 3] == 2 and seen[B + W - 2] == 1
    cm.free(req)
    assert cm.window_pool.num_free == 8 and cm.comp_pool.num_free == 8 and cm.num_free_state_slots == 4


def test_released_window_blocks_go_to_the_prefix_cache():
    cm = make_cache()
    a = Request("a", list(range(3 * B)), max_tokens=4)
    run_prompt(cm, a, chunk=B)
    # Blocks 0 and 1 left the window: released by a, but hashed, so evictable (not free).
    assert a.window_blocks[:2] == (-1, -1) and cm.window_pool.num_evictable == 2
    assert cm.window_pool.num_held == 1 and cm.comp_pool.num_held == 3
    b = Request("b", list(range(2 * B)) + [7, 7], max_tokens=4)
    hit = cm.find_prefix_hit(b)
    assert hit.num_blocks == 2
    cm.admit(b, hit)
    assert cm.window_pool.num_evictable == 1  # the hit took block 1's window block back out
    check(cm)


def test_num_fitting_tokens_and_allocate():
    cm = make_cache(num_comp=3, num_window=3)
    req = Request("r", list(range(5 * B)), max_tokens=1)
    cm.admit(req, cm.find_prefix_hit(req))
    assert cm.num_fitting_tokens(req, 2 * B) == 2 * B
    assert cm.num_fitting_tokens(req, 5 * B) == 3 * B  # shrinks to whole free blocks
    cm.allocate(req, 3 * B)
    assert cm.num_fitting_tokens(req, 3 * B) == 3 * B and cm.num_fitting_tokens(req, 3 * B + 1) == 3 * B
    req.num_computed_tokens = 3 * B
    cm.on_computed(req)  # blocks 0, 1 leave the window; the compressed group is the limit now
    assert cm.num_free_window_blocks == 2 and cm.num_free_comp_blocks == 0
    assert cm.num_fitting_tokens(req, 1) == 0
    with pytest.raises(RuntimeError, match="do not fit"):
        cm.allocate(req, 1)
    assert cm.blocks_needed_alone(3 * B) == (3, 2) and cm.blocks_needed_alone(3) == (1, 1)
    check(cm)


def test_prefix_caching_off_frees_everything():
    cm = make_cache(prefix=False)
    a = Request("a", list(range(3 * B)), max_tokens=4)
    run_prompt(cm, a)
    cm.free(a)
    b = Request("b", list(range(3 * B)), max_tokens=4)
    assert cm.find_prefix_hit(b).num_blocks == 0
    assert cm.comp_pool.num_free == 16 and cm.window_pool.num_free == 16 and cm.comp_pool.num_evictable == 0
    assert cm.prefix_hit_rate == 0.0 and cm.num_prefix_query_tokens == 0
