"""BlockManager as pure Python: allocation and freeing, hash-chained prefix reuse of full blocks only, eviction of
unused cached blocks (LRU), decode growth, and the invariants of infer/block_manager.py's docstring."""

import pytest

from infer.block_manager import BlockManager
from infer.sequence import Sequence

BS = 4


def make_seq(tokens, rid=None):
    return Sequence(rid if rid is not None else object(), list(tokens))


def compute(bm, seq, upto=None):
    """What a step does to a sequence: its KV up to `upto` (default: all but nothing left) is now in the pool."""
    seq.num_cached_tokens = seq.num_tokens if upto is None else upto
    bm.cache_full_blocks(seq)


def test_allocate_and_free_restore_the_pool():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 7 and bm.num_used_blocks == 3 and bm.usage == pytest.approx(0.3)
    bm.check_invariants([seq])
    bm.free(seq)
    assert bm.num_free_blocks == 10 and seq.block_table == []
    bm.free(seq)  # twice is harmless
    assert bm.num_free_blocks == 10
    bm.check_invariants([])


def test_slot_mapping_follows_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=BS)
    filler = make_seq(range(5))
    bm.allocate(filler)  # so the next sequence's blocks are not 0, 1, ...
    seq = make_seq(range(100, 110))
    bm.allocate(seq)
    for p in range(10):
        assert bm.slot_of(seq, p) == seq.block_table[p // BS] * BS + p % BS
    assert bm.slot_mapping(seq, 3, 10) == [bm.slot_of(seq, p) for p in range(3, 10)]
    with pytest.raises(ValueError, match="past its"):
        bm.slot_mapping(seq, 0, 13)


def test_shared_three_block_prefix_is_reused():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(3 * BS))
    a = make_seq(prefix + [900, 901])
    bm.allocate(a)
    compute(bm, a)
    assert bm.num_cached_blocks == 3  # the three full blocks; the partial fourth is not registered
    b = make_seq(prefix + [700, 701, 702])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]  # partial blocks are never shared
    assert b.num_cached_tokens == b.num_prefix_hit_tokens == 3 * BS
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 2, 1]
    assert bm.prefix_hit_rate == pytest.approx(12 / (14 + 15))
    bm.check_invariants([a, b])
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1, 1]
    bm.check_invariants([b])


def test_identical_prompts_share_only_full_blocks_and_keep_the_last_token_uncached():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(14))  # 3 full blocks + 2 tokens
    bm.allocate(a)
    compute(bm, a)
    b = make_seq(range(14))
    bm.allocate(b)
    assert b.num_cached_tokens == 12 and b.block_table[3] != a.block_table[3]
    # Block-aligned prompt, fully cached: the last block is recomputed privately (its last token's logits are needed).
    c = make_seq(range(12))
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2] and c.block_table[2] != a.block_table[2]
    assert bm.blocks[c.block_table[2]].ref_count == 1
    bm.check_invariants([a, b, c])


def test_blocks_are_not_shared_before_their_kv_is_complete():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(13))
    bm.allocate(a)
    compute(bm, a, upto=5)  # a chunked prefill half way: only block 0 is complete
    assert bm.num_cached_blocks == 1
    b = make_seq(range(13))
    bm.allocate(b)
    assert b.num_cached_tokens == BS and b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    bm.check_invariants([a, b])


def test_same_prefix_computed_twice_keeps_one_registered_copy():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a, b = make_seq(range(9)), make_seq(range(9))
    bm.allocate(a)
    bm.allocate(b)  # same step: nothing registered yet, both compute privately
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    compute(bm, a)
    compute(bm, b)
    assert bm.num_cached_blocks == 2
    assert all(bm.blocks[i].hash is None for i in b.block_table)
    bm.check_invariants([a, b])
    bm.free(b)
    bm.free(a)
    assert bm.num_evictable_blocks == 2 and len(bm.free_block_ids) == 14
    bm.check_invariants([])


def test_freed_prefix_stays_reusable_until_evicted():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(range(13))  # 4 blocks, 3 full
    bm.allocate(a)
    compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 6 and bm.num_evictable_blocks == 3 and bm.usage == 0.0
    # Re-request: a hit, also reviving evictable blocks (they leave the free count).
    again = make_seq(range(13))
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.num_prefix_hit_tokens == 12 and bm.num_evictable_blocks == 0
    bm.check_invariants([again])
    bm.free(again)
    # A different request that needs the whole pool evicts the cached blocks.
    big = make_seq(range(500, 524))
    assert bm.can_allocate(big)
    bm.allocate(big)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    bm.free(big)
    late = make_seq(range(13))
    bm.allocate(late)
    assert late.num_cached_tokens == 0
    bm.check_invariants([late])


def test_eviction_is_lru_and_tail_first():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(8))  # 2 full blocks
    b = make_seq(range(100, 108))
    for s in (a, b):
        bm.allocate(s)
        compute(bm, s)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert list(bm.evictable_block_ids) == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    # Only 4 truly free blocks: a 5-block request evicts exactly the oldest cached block (a's tail).
    c = make_seq(range(200, 220))
    bm.allocate(c)
    assert a_blocks[1] in c.block_table and bm.num_cached_blocks == 3
    again = make_seq(range(9))  # a's first block is still cached, its second is gone: a one-block hit
    bm.allocate(again)
    assert again.num_cached_tokens == BS and again.block_table[0] == a_blocks[0]
    bm.check_invariants([c, again])


def test_can_allocate_counts_revived_evictable_hits():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(9))
    bm.allocate(a)
    compute(bm, a)
    bm.free(a)  # 2 evictable + 2 free
    holder = make_seq(range(300, 304))
    bm.allocate(holder)  # takes a free block: 3 allocatable left (1 free + 2 evictable)
    b = make_seq(list(range(8)) + [1, 2, 3, 4, 5])  # 4 blocks: 2 hits (both evictable) + 2 new -> 4 > 3
    assert not bm.can_allocate(b)
    with pytest.raises(RuntimeError, match="needs 4 blocks"):
        bm.allocate(b)
    c = make_seq(list(range(8)) + [1])  # 3 blocks: 2 hits + 1 new = 3 from the allocatable count
    assert bm.can_allocate(c)
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and bm.num_free_blocks == 0
    bm.check_invariants([holder, c])


def test_decode_growth_appends_a_block_when_the_last_is_full_and_registers_it():
    bm = BlockManager(num_blocks=3, block_size=BS)
    seq = make_seq(range(3))
    bm.allocate(seq)
    for t in range(9):  # decode: each step computes the uncached token(s) and appends one sampled token
        compute(bm, seq)
        seq.append_token(50 + t)
        if bm.num_blocks_needed(seq.num_tokens) > len(seq.block_table):
            assert bm.can_append(seq)
            bm.append_slot(seq)
        assert len(seq.block_table) == bm.num_blocks_needed(seq.num_tokens)
        bm.check_invariants([seq])
    assert seq.num_tokens == 12 and len(seq.block_table) == 3
    assert bm.num_cached_blocks == 2  # the third block's last token is not computed yet
    seq.append_token(99)
    assert not bm.can_append(seq)
    with pytest.raises(RuntimeError, match="more blocks"):
        bm.append_slot(seq)


def test_forced_tokens_get_several_blocks_at_once():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(4))
    bm.allocate(seq)
    compute(bm, seq)
    for t in range(9):
        seq.append_token(t)
    bm.append_slot(seq)
    assert len(seq.block_table) == 4
    bm.check_invariants([seq])


def test_a_hash_collision_serves_no_wrong_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(5))
    bm.allocate(a)
    compute(bm, a)
    # Pretend another block's tokens hashed equal: the stored token ids disagree, so it is not a hit.
    bm.blocks[a.block_table[0]].token_ids = (7, 7, 7, 7)
    b = make_seq(range(5))
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_reset_prefix_cache_stops_reuse():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(9))
    bm.allocate(a)
    compute(bm, a)
    keep = make_seq(range(100, 105))
    bm.allocate(keep)
    compute(bm, keep)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_evictable_blocks == 0 and bm.num_free_blocks == 6
    b = make_seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    bm.check_invariants([keep, b])


def test_bad_use_fails_loudly():
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="empty"):
        Sequence("r", [])
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(range(5))
    with pytest.raises(RuntimeError, match="allocate it first"):
        bm.append_slot(seq)
    bm.allocate(seq)
    with pytest.raises(RuntimeError, match="already owns"):
        bm.allocate(seq)
