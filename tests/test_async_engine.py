"""The asyncio front: concurrent streams equal offline generation; leaving a stream early frees its blocks."""

import asyncio

import torch

from infer.async_engine import AsyncEngine
from infer.engine import Engine
from infer.sampling import SamplingParams
from tests.test_engine import make_model, prompts, tok  # noqa: F401  (tok is a fixture)


def test_concurrent_streams_match_generate_and_early_exit_aborts(tok):  # noqa: F811
    torch.manual_seed(0)
    model = make_model(tok)
    params = SamplingParams(temperature=0, max_tokens=10)
    ps = prompts(tok)[:4]
    expected = Engine(model, tok, block_size=8, num_blocks=64, log=lambda _: None).generate(ps, params)
    engine = Engine(model, tok, block_size=8, num_blocks=64, log=lambda _: None)
    aengine = AsyncEngine(engine).start()

    async def collect(p):
        toks, text = [], []
        async for out in aengine.generate(p, params):
            toks.extend(out.token_ids)
            text.append(out.text)
        return toks, "".join(text)

    async def leave_early(p):
        async for out in aengine.generate(p, SamplingParams(temperature=0, max_tokens=40)):
            if out.token_ids:
                break  # the client went away after its first token

    async def main():
        return await asyncio.gather(*(collect(p) for p in ps), leave_early(ps[0]))

    try:
        results = asyncio.run(main())
    finally:
        aengine.stop()
    for (toks, text), exp in zip(results[:4], expected):
        assert toks == exp.token_ids and text == exp.text
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0


def test_between_steps_never_overlaps_a_step(tok):  # noqa: F811
    """between_steps(fn) runs fn while no engine step is running, even with generations streaming meanwhile (the
    server scores completions prompts this way), and returns fn's result."""
    torch.manual_seed(0)
    engine = Engine(make_model(tok), tok, block_size=8, num_blocks=64, log=lambda _: None)
    in_step, overlaps, step = [False], [], engine.step

    def traced_step():
        in_step[0] = True
        try:
            return step()
        finally:
            in_step[0] = False

    engine.step = traced_step
    aengine = AsyncEngine(engine).start()

    def probe(i):
        overlaps.append(in_step[0])
        return i * 2

    async def stream(p):
        async for _ in aengine.generate(p, SamplingParams(temperature=0, max_tokens=12)):
            pass

    async def main():
        tasks = [asyncio.create_task(stream(p)) for p in prompts(tok)[:4]]
        results = [await asyncio.to_thread(aengine.between_steps, lambda i=i: probe(i)) for i in range(20)]
        await asyncio.gather(*tasks)
        return results

    try:
        results = asyncio.run(main())
    finally:
        aengine.stop()
    assert results == [2 * i for i in range(20)]
    assert len(overlaps) == 20 and not any(overlaps)
