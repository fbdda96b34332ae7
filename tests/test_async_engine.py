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
