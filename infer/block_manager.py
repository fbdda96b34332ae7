"""The paged KV cache's bookkeeping: which pool blocks each sequence owns, reference counts, and prefix reuse.

    bm = BlockManager(num_blocks=1024, block_size=16)
    if bm.can_allocate(seq): bm.allocate(seq)        # admission: blocks for all of seq's tokens, prefix hits reused
    if bm.can_append(seq): bm.append_slot(seq)       # before a step: blocks for tokens appended since (decode: 1)
    bm.cache_full_blocks(seq)                        # after a step: blocks whose KV is now complete become shareable
    bm.slot_mapping(seq, start, end)                 # pool slots of positions start..end-1 (kv_store's slot_mapping)
    bm.free(seq)                                     # finish / abort / preempt; idempotent

Pure Python bookkeeping over block ids; the KV tensors live in the runner's pool (num_blocks, block_size, Hkv, D),
and token t of a sequence lives at slot block_table[t // block_size] * block_size + t % block_size.

Prefix reuse (vLLM's automatic prefix caching, nano-vllm's hash chain): a FULL block is named by the hash of its
token ids chained with its predecessor's hash, so equal prefixes map to equal hashes whatever request they come from.
A block is registered under its hash only once its KV is complete (`cache_full_blocks`, after the step that wrote
its last token): registering at allocation, as nano-vllm does, would let a request admitted while a chunked prefill
is still in flight read KV that was never written. Two requests that compute the same block in the same step both
keep private copies; the first to finish the block registers it, the other's copy stays private (no hash).
A hit also compares the block's stored token ids, so a 64-bit hash collision between different blocks cannot serve
wrong KV; a collision between two different *prefixes* that end in the same block tokens (parent hashes equal by
chance, ~2^-64 per pair) is not detected, as in vLLM's default hash.

Pool states of a block: free (ref_count 0, no hash), evictable (ref_count 0, registered: reusable by a prefix hit
until a new allocation evicts it, least recently freed first), in use (ref_count = number of block tables holding it).
New blocks come from the free list first, so cached blocks survive as long as possible. A sequence's blocks are
freed tail first, so the deep end of a chain is evicted before its head (a chain is useless past its first gap).

Invariants (checked by `check_invariants`, asserted by the tests):
- ref_count >= 0, and equals the number of block tables that hold the block; free + evictable + in use = the pool.
- Only full blocks whose KV is complete are shared; a block that is still being written (the partially filled last
  block, or any block past num_cached_tokens) is private (ref_count 1). So no copy-on-write is needed: nobody writes
  into a shared block. The last token of a prompt is never served from the cache (its logits are needed), so a
  block-aligned prompt that is fully cached recomputes its last block into a private block (vLLM v1 does the same).
- A sequence that owns blocks has them for every token whose KV is in the cache (len(block_table) * block_size >=
  num_cached_tokens); after allocate/append_slot, for every token it has (>= num_tokens).

Limits: no copy-on-write, no sliding-window block freeing, no per-request cache salt (every request may hit every
other's prefix: fine for one model and one tenant); `reset_prefix_cache` (after a weight update) only stops reuse:
blocks held by running sequences keep the KV they were computed with.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from infer.sequence import Sequence

_ROOT_HASH = 0  # the "parent" of every chain's first block


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set only while registered in the prefix cache
        self.token_ids: tuple[int, ...] | None = None  # the registered block's tokens, checked on every hit

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hashed={self.hash is not None})"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.evictable_block_ids: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.hash_to_block_id: dict[int, int] = {}
        # Prefix-cache counters for metrics (vLLM's prefix cache queries / hits, in tokens).
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # --------------------------------------------------------------------------------------------------- stats

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take now: free ones plus evictable cached ones."""
        return len(self.free_block_ids) + len(self.evictable_block_ids)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self.evictable_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or evictable."""
        return len(self.hash_to_block_id)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences (vLLM's kv_cache_usage_perc: evictable blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------ prefix matching

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(seq.token_ids[index * bs:(index + 1) * bs])

    def _block_hash(self, seq: Sequence, index: int) -> int:
        """Chain hash of seq's full block `index`, extending seq.block_hashes as needed."""
        hashes = seq.block_hashes
        assert (index + 1) * self.block_size <= seq.num_tokens, "only full blocks have a hash"
        while len(hashes) <= index:
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash((parent, self._block_tokens(seq, len(hashes)))))
        return hashes[index]

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of seq's longest cached prefix of full blocks, leaving its last token uncached."""
        num_matchable = (seq.num_tokens - 1) // self.block_size  # the last token's logits are needed: recompute it
        hits = []
        for i in range(num_matchable):
            block_id = self.hash_to_block_id.get(self._block_hash(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(seq, i):
                break  # a chain is only valid up to its first miss
            hits.append(block_id)
        return hits

    # ------------------------------------------------------------------------------------------ pool primitives

    def _take_new_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            # Evict the least recently freed cached block: its hash goes, its KV will be overwritten.
            block_id, _ = self.evictable_block_ids.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block_id[block.hash]
            block.hash = block.token_ids = None
        block = self.blocks[block_id]
        assert block.ref_count == 0
        block.ref_count = 1
        return block_id

    def _share_cached_block(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable_block_ids[block_id]  # revived: no longer evictable
        block.ref_count += 1

    # ---------------------------------------------------------------------------------------------- allocation

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all of seq's tokens can be had now (prefix hits on in-use blocks cost nothing)."""
        hits = self._match_prefix(seq)
        num_new = self.num_blocks_needed(seq.num_tokens) - len(hits)
        num_revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # evictable hits leave the free count
        return num_new + num_revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence without blocks blocks for all its tokens, reusing its cached prefix (sets
        num_cached_tokens to the hit length). Raises if the pool cannot hold it: ask can_allocate first."""
        if seq.block_table:
            raise RuntimeError(f"request {seq.request_id!r} already owns blocks {seq.block_table}")
        if not self.can_allocate(seq):
            raise RuntimeError(f"request {seq.request_id!r} needs {self.num_blocks_needed(seq.num_tokens)} blocks, "
                               f"only {self.num_free_blocks} of {self.num_blocks} are free")
        hits = self._match_prefix(seq)
        for block_id in hits:  # before taking new blocks, so an evictable hit cannot be evicted by this allocation
            self._share_cached_block(block_id)
        num_new = self.num_blocks_needed(seq.num_tokens) - len(hits)
        seq.block_table = hits + [self._take_new_block() for _ in range(num_new)]
        seq.num_hashed_blocks = len(hits)
        seq.num_cached_tokens = seq.num_prefix_hit_tokens = len(hits) * self.block_size
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += seq.num_prefix_hit_tokens

    def can_append(self, seq: Sequence) -> bool:
        """Whether the blocks for the tokens seq gained since its last allocation can be had now."""
        return self.num_blocks_needed(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        """Give seq new blocks until they cover all its tokens: one block when a decode's last block is full, more
        after forced tokens (tool output). New blocks are private; they are registered by cache_full_blocks once
        their KV is complete."""
        if not seq.block_table:
            raise RuntimeError(f"request {seq.request_id!r} owns no blocks: allocate it first")
        num_new = self.num_blocks_needed(seq.num_tokens) - len(seq.block_table)
        if num_new > self.num_free_blocks:
            raise RuntimeError(f"request {seq.request_id!r} needs {num_new} more blocks, only "
                               f"{self.num_free_blocks} are free")
        seq.block_table.extend(self._take_new_block() for _ in range(num_new))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks whose KV is now complete (full and below num_cached_tokens) in the prefix cache.
        Call after every step that advanced num_cached_tokens."""
        num_full = seq.num_cached_tokens // self.block_size
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            h = self._block_hash(seq, i)
            if block.hash is None and h not in self.hash_to_block_id:
                block.hash, block.token_ids = h, self._block_tokens(seq, i)
                self.hash_to_block_id[h] = block.block_id
            # else: an equal block was registered first (same prefix computed concurrently); this copy stays private
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop seq's references to its blocks; registered blocks become evictable (still reusable), others free.
        Idempotent: a sequence without blocks is left as it is."""
        for block_id in reversed(seq.block_table):  # tail first: the deep end of a chain is evicted first
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than it was taken"
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable_block_ids[block_id] = None  # newest at the end of the LRU order
                else:
                    self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (after a weight update: cached KV belongs to the old weights)."""
        for block_id in self.hash_to_block_id.values():
            block = self.blocks[block_id]
            block.hash = block.token_ids = None
        self.free_block_ids.extend(self.evictable_block_ids)
        self.evictable_block_ids.clear()
        self.hash_to_block_id.clear()

    # ---------------------------------------------------------------------------------------------- slot maps

    def slot_of(self, seq: Sequence, position: int) -> int:
        """Pool slot of seq's token at `position`: block_id * block_size + offset."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Pool slots of seq's positions start..end-1 (the new tokens of a step, for kv_store)."""
        if end > len(seq.block_table) * self.block_size:
            raise ValueError(f"request {seq.request_id!r}: position {end - 1} is past its "
                             f"{len(seq.block_table)} blocks of {self.block_size}")
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ---------------------------------------------------------------------------------------------- debugging

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Assert the module docstring's invariants, given every sequence that owns blocks. O(pool); for tests and
        debug modes, not for every step of a production engine."""
        holders: dict[int, list[Sequence]] = {}
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} holds a block twice"
            assert len(seq.block_table) * self.block_size >= seq.num_cached_tokens, f"{seq} lacks blocks for its KV"
            assert len(seq.block_table) <= self.num_blocks_needed(seq.num_tokens), f"{seq} holds spare blocks"
            for block_id in seq.block_table:
                holders.setdefault(block_id, []).append(seq)
        free, evictable = set(self.free_block_ids), set(self.evictable_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is in the free list twice"
        assert not free & evictable, "a block is both free and evictable"
        for block in self.blocks:
            owners = holders.get(block.block_id, [])
            assert block.ref_count >= 0, f"{block} has a negative ref_count"
            assert block.ref_count == len(owners), f"{block} is held by {len(owners)} tables"
            if block.ref_count == 0:
                in_free, in_evictable = block.block_id in free, block.block_id in evictable
                assert in_free != in_evictable, f"{block} is unused but not exactly one of free/evictable"
                assert in_evictable == (block.hash is not None), f"{block}: evictable iff registered"
            else:
                assert block.block_id not in free and block.block_id not in evictable, f"{block} in use but free"
            if block.hash is not None:
                assert self.hash_to_block_id.get(block.hash) == block.block_id, f"{block} not in the hash map"
            if block.ref_count > 1 or block.hash is not None:
                # Shared (or shareable) blocks are full and complete in every holder: nobody writes into them.
                for seq in owners:
                    index = seq.block_table.index(block.block_id)
                    assert (index + 1) * self.block_size <= seq.num_cached_tokens, (
                        f"{block} is shared but {seq} has not completed it (block {index})")
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h
