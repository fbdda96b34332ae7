"""Scheduler as pure Python, driven by a fake model that writes a digest of each token's prefix into a simulated KV
pool and checks, for every scheduled token, that every earlier position of its sequence holds the right digest. So
beyond the scheduler's own invariants (token budget, sequence cap, blocks for every token, writes only into private
blocks, block-manager consistency) these tests catch a prefix hit on wrong or incomplete KV, a block reused while
still referenced, and a recompute that skips tokens. Next tokens are a function of the prefix digest: a sequence
generates the same tokens whether or not it was preempted, batched or served from the prefix cache."""

import random

import pytest

from infer.block_manager import BlockManager
from infer.scheduler import QueueFullError, ScheduledBatch, Scheduler
from infer.sequence import FINISH_ABORT, FINISH_LENGTH, Sequence, SequenceStatus

BS = 4
VOCAB = 7  # small, so random prompts and generations repeat blocks


class FakeModel:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.pool: dict[int, int] = {}  # slot -> digest of the prefix ending at the token stored there
        self.digests: dict[int, list[int]] = {}  # seq_id -> digest of token_ids[: p + 1] for each p

    def digest(self, seq: Sequence, p: int) -> int:
        d = self.digests.setdefault(seq.seq_id, [])
        while len(d) <= p:
            d.append(hash((d[-1] if d else -1, seq.token_ids[len(d)])))
        return d[p]

    def run(self, batch: ScheduledBatch) -> list[int]:
        for item in batch.items:  # kv_store for the whole step first, as the runner does
            seq = item.seq
            for p in range(item.num_cached_tokens, item.seq_len):
                slot = self.bm.slot_of(seq, p)
                assert self.bm.blocks[slot // BS].ref_count == 1, f"{seq} writes position {p} into a shared block"
                self.pool[slot] = self.digest(seq, p)
        sampled = []
        for item in batch.items:  # attention: every position up to the last new one must hold its own KV
            seq = item.seq
            for p in range(item.seq_len):
                assert self.pool.get(self.bm.slot_of(seq, p)) == self.digest(seq, p), f"{seq}: wrong KV at {p}"
            sampled.append(self.digest(seq, item.seq_len - 1) % VOCAB)
        return sampled


def check_step(sched: Scheduler, batch: ScheduledBatch) -> None:
    assert batch.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert [item.is_decode for item in batch.items] == sorted((item.is_decode for item in batch.items), reverse=True)
    assert len({item.seq.seq_id for item in batch.items}) == len(batch.items)
    for item in batch.items:
        seq = item.seq
        assert seq.status is SequenceStatus.RUNNING and item.num_new_tokens >= 1
        assert item.num_cached_tokens == seq.num_cached_tokens and item.seq_len <= seq.num_tokens
    for seq in sched.running:  # a running sequence always has blocks for all its tokens
        assert len(seq.block_table) == sched.block_manager.num_blocks_needed(seq.num_tokens)
    for seq in sched.waiting:
        assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED) and not seq.block_table
    assert set(sched.requests.values()) == set(sched.running) | set(sched.waiting)
    sched.block_manager.check_invariants(sched.running)


def step(sched: Scheduler, model: FakeModel) -> ScheduledBatch:
    """One engine step; the driver's stop condition is max_tokens."""
    batch = sched.schedule()
    check_step(sched, batch)
    if batch.is_empty:
        return batch
    for seq in sched.postprocess(batch, model.run(batch)):
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish(seq, FINISH_LENGTH)
    return batch


def run_to_completion(sched: Scheduler, model: FakeModel, max_steps: int = 10_000) -> int:
    for n in range(max_steps):
        if not sched.has_unfinished:
            return n
        step(sched, model)
    raise AssertionError(f"not done after {max_steps} steps: {sched.running} {list(sched.waiting)}")


def make(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, max_waiting=64):
    bm = BlockManager(num_blocks, BS)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_waiting), FakeModel(bm)


def reference_outputs(prompt, max_tokens):
    """What a sequence generates alone in a roomy pool."""
    sched, model = make(num_blocks=256)
    seq = Sequence("ref", prompt, max_tokens=max_tokens)
    sched.add(seq)
    run_to_completion(sched, model)
    return seq.output_token_ids


def test_one_request_runs_to_completion_and_frees_its_blocks():
    sched, model = make()
    seq = Sequence("a", [1, 2, 3, 4, 5, 6], max_tokens=10)
    sched.add(seq)
    run_to_completion(sched, model)
    assert seq.is_finished and seq.finish_reason == FINISH_LENGTH and seq.num_output_tokens == 10
    assert seq.block_table == [] and sched.block_manager.num_used_blocks == 0
    assert seq.num_computed_tokens == 6 + 9  # the prompt, then one token per decode step


def test_prefix_is_reused_across_requests_through_the_scheduler():
    sched, model = make()
    prefix = [1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5]  # three full blocks
    a = Sequence("a", prefix + [6], max_tokens=3)
    sched.add(a)
    run_to_completion(sched, model)
    b = Sequence("b", prefix + [0, 0], max_tokens=3)
    sched.add(b)
    run_to_completion(sched, model)
    assert b.num_prefix_hit_tokens == 12 and b.num_computed_tokens == 2 + 2
    assert b.output_token_ids == reference_outputs(prefix + [0, 0], 3)


def test_chunked_prefill_respects_the_budget_and_does_not_starve_decodes():
    sched, model = make(max_num_seqs=4, max_num_batched_tokens=16)
    decoders = [Sequence(f"d{i}", [i + 1, 2, 3], max_tokens=40) for i in range(3)]
    for s in decoders:
        sched.add(s)
    step(sched, model)  # three short prefills
    assert all(s.num_output_tokens == 1 for s in decoders)
    long = Sequence("long", [i % VOCAB for i in range(100)], max_tokens=2)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        before = [s.num_output_tokens for s in decoders]
        batch = step(sched, model)
        assert batch.num_batched_tokens <= 16
        assert [s.num_output_tokens for s in decoders] == [b + 1 for b in before]  # every decode advanced
        chunks += [item.num_new_tokens for item in batch.items if item.seq is long]
    assert chunks == [13] * 7 + [9] and sum(chunks) == 100
    run_to_completion(sched, model)
    assert long.output_token_ids == reference_outputs(long.prompt_token_ids, 2)


def test_preemption_when_blocks_run_out_and_the_preempted_request_completes():
    # 8 blocks of 4 = 32 tokens; two requests growing to 6 + 14 = 20 tokens each cannot both stay.
    sched, model = make(num_blocks=8, max_num_seqs=4, max_num_batched_tokens=16)
    prompts = {"early": [1, 2, 3, 4, 5, 6], "late": [6, 5, 4, 3, 2, 1]}
    seqs = {rid: Sequence(rid, p, max_tokens=14, arrival_time=t) for t, (rid, p) in enumerate(prompts.items())}
    for s in seqs.values():
        sched.add(s)
    preempted = []
    while sched.has_unfinished:
        batch = step(sched, model)
        preempted += batch.preempted
    assert preempted and all(s is seqs["late"] for s in preempted)  # the most recent arrival gives way
    assert seqs["late"].num_preemptions >= 1 and seqs["early"].num_preemptions == 0
    for rid, s in seqs.items():
        assert s.finish_reason == FINISH_LENGTH
        assert s.output_token_ids == reference_outputs(prompts[rid], 14)
    assert sched.block_manager.num_used_blocks == 0


def test_preempted_request_goes_to_the_front_and_recomputes_prompt_and_output():
    sched, model = make(num_blocks=6, max_num_seqs=4, max_num_batched_tokens=16)
    a = Sequence("a", [1, 2, 3, 4, 5], max_tokens=15, arrival_time=0)  # 20 tokens each, 24 in the pool
    b = Sequence("b", [5, 4, 3, 2, 1], max_tokens=15, arrival_time=1)
    c = Sequence("c", [3, 3, 3], max_tokens=1, arrival_time=2)
    sched.add(a)
    sched.add(b)
    while not b.num_preemptions:
        batch = step(sched, model)
    assert batch.preempted == [b] and b.status is SequenceStatus.PREEMPTED and b.num_output_tokens > 0
    sched.add(c)
    assert list(sched.waiting) == [b, c]
    sched.finish(a, "stop")  # room again: b resumes first, prefilling prompt + generated tokens
    n_tokens = b.num_tokens
    batch = step(sched, model)
    (item,) = [it for it in batch.items if it.seq is b]
    assert item.num_cached_tokens + item.num_new_tokens == n_tokens and item.samples_token


def test_abort_frees_blocks_at_once_and_is_idempotent():
    sched, model = make()
    bm = sched.block_manager
    running = Sequence("run", list(range(1, 7)) * 2, max_tokens=50)
    waiting = Sequence("wait", [1, 2], max_tokens=50)
    sched.add(running)
    step(sched, model)
    sched.add(waiting)
    assert bm.num_used_blocks == len(running.block_table) == 3
    assert sched.abort("run") and bm.num_used_blocks == 0 and running.finish_reason == FINISH_ABORT
    assert not sched.abort("run") and not sched.abort("never-seen")
    assert sched.abort("wait") and not sched.waiting and not sched.has_unfinished
    bm.check_invariants([])


def test_abort_while_the_step_runs_is_skipped_by_postprocess():
    sched, model = make()
    a, b = Sequence("a", [1, 2, 3], max_tokens=5), Sequence("b", [3, 2, 1], max_tokens=5)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sampled = model.run(batch)
    assert sched.abort("a")
    grown = sched.postprocess(batch, sampled)
    assert grown == [b] and a.num_output_tokens == 0 and a.block_table == []
    run_to_completion(sched, model)
    assert b.num_output_tokens == 5 and sched.block_manager.num_used_blocks == 0


def test_bounded_waiting_queue():
    sched, model = make(max_waiting=2)
    sched.add(Sequence("a", [1], max_tokens=1))
    sched.add(Sequence("b", [1], max_tokens=1))
    with pytest.raises(QueueFullError, match="busy, retry"):
        sched.add(Sequence("c", [1], max_tokens=1))
    step(sched, model)  # both admitted: the queue has room again
    sched.add(Sequence("c", [1], max_tokens=1))


def test_requests_that_cannot_fit_are_rejected_with_their_numbers():
    sched, _ = make(num_blocks=4)
    with pytest.raises(ValueError, match=r"prompt \(10 tokens\) \+ max_tokens \(7\) = 17 exceeds the KV cache \(16"):
        sched.add(Sequence("big", list(range(10)), max_tokens=7))
    sched.add(Sequence("x", [1], max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(Sequence("x", [1], max_tokens=1))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=4)


def test_a_lone_sequence_outgrowing_the_pool_finishes_with_length():
    sched, model = make(num_blocks=2)
    seq = Sequence("grow", [1, 2, 3])  # no max_tokens: only the pool stops it
    sched.add(seq)
    finished = []
    for _ in range(20):
        batch = sched.schedule()
        check_step(sched, batch)
        finished += batch.finished
        if batch.is_empty:
            break
        sched.postprocess(batch, model.run(batch))
    assert finished == [seq] and seq.finish_reason == FINISH_LENGTH and seq.num_tokens == 9
    assert sched.block_manager.num_used_blocks == 0


def test_max_num_seqs_caps_the_running_set():
    sched, model = make(max_num_seqs=3, max_num_batched_tokens=64)
    seqs = [Sequence(i, [i % VOCAB, 1], max_tokens=4) for i in range(7)]
    for s in seqs:
        sched.add(s)
    batch = step(sched, model)
    assert len(batch.items) == 3 and sched.num_running == 3 and sched.num_waiting == 4
    run_to_completion(sched, model)
    assert all(s.num_output_tokens == 4 for s in seqs)


def test_forced_tokens_are_prefilled_at_the_next_step():
    sched, model = make(max_num_batched_tokens=32)
    seq = Sequence("tool", [1, 2, 3], max_tokens=30)
    sched.add(seq)
    step(sched, model)
    step(sched, model)
    forced = [4, 4, 5, 5, 6, 6, 0, 0, 1]  # e.g. <|output_start|> ... <|output_end|>
    for t in forced:
        seq.append_token(t)
    batch = step(sched, model)
    (item,) = batch.items
    assert item.num_new_tokens == len(forced) + 1 and item.samples_token and not item.is_decode
    run_to_completion(sched, model)
    assert seq.num_output_tokens == 30


def test_schedule_and_postprocess_must_alternate():
    sched, model = make()
    sched.add(Sequence("a", [1, 2], max_tokens=2))
    batch = sched.schedule()
    with pytest.raises(RuntimeError, match="postprocess the batch in flight"):
        sched.schedule()
    with pytest.raises(ValueError, match="sampled tokens"):
        sched.postprocess(batch, [])
    sched.postprocess(batch, model.run(batch))
    with pytest.raises(RuntimeError, match="not the one in flight"):
        sched.postprocess(batch, [0])


@pytest.mark.parametrize("seed", range(10))
def test_random_stress_with_aborts(seed):
    rng = random.Random(seed)
    num_blocks = rng.choice([12, 24, 64])
    max_num_seqs = rng.choice([2, 5, 16])
    sched, model = make(num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=rng.choice([max_num_seqs, 24, 64]), max_waiting=1000)
    capacity = num_blocks * BS
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(4)]
    seqs, aborted = [], set()
    num_to_add, steps, num_preempted = 120, 0, 0
    while num_to_add or sched.has_unfinished:
        for _ in range(rng.choice([0, 0, 1, 3])):
            if not num_to_add:
                break
            prompt = rng.choice(prefixes)[: rng.randrange(1, 20)] if rng.random() < 0.6 else []
            prompt = prompt + [rng.randrange(VOCAB) for _ in range(rng.randrange(0 if prompt else 1, 30))]
            max_tokens = rng.randrange(1, min(40, capacity - len(prompt)))
            seq = Sequence(len(seqs), prompt, max_tokens=max_tokens, arrival_time=steps)
            sched.add(seq)
            seqs.append(seq)
            num_to_add -= 1
        if seqs and rng.random() < 0.08:
            victim = rng.choice(seqs)
            if sched.abort(victim.request_id):
                aborted.add(victim.request_id)
            assert not sched.abort(victim.request_id)
        num_preempted += len(step(sched, model).preempted)
        steps += 1
        assert steps < 20_000
    assert sched.block_manager.num_used_blocks == 0 and not sched.waiting and not sched.running
    sched.block_manager.check_invariants([])
    # The seeds exercise what they are meant to: prefix hits always, preemption whenever the pool is small.
    assert sched.block_manager.num_hit_tokens > 0
    assert num_preempted > 0 or num_blocks == 64
    for seq in seqs:
        assert seq.is_finished
        if seq.request_id in aborted:
            assert seq.finish_reason == FINISH_ABORT
        else:
            assert seq.finish_reason == FINISH_LENGTH and seq.num_output_tokens == seq.max_tokens
    # Deterministic generation: a sample of completed requests match their solo runs despite batching,
    # preemption and prefix hits.
    done = [s for s in seqs if s.request_id not in aborted]
    for seq in rng.sample(done, min(5, len(done))):
        assert seq.output_token_ids == reference_outputs(seq.prompt_token_ids, seq.max_tokens)


def test_a_token_forced_in_while_the_step_runs_drops_the_stale_sample():
    sched, model = make()
    seq = Sequence("a", [1, 2, 3], max_tokens=5)
    sched.add(seq)
    batch = sched.schedule()
    sampled = model.run(batch)
    seq.append_token(6)  # engine misuse: forced while the step was in flight
    assert sched.postprocess(batch, sampled) == [] and seq.token_ids == [1, 2, 3, 6]
    batch = step(sched, model)
    assert batch.items[0].num_cached_tokens == 3 and batch.items[0].samples_token
