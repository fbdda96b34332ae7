"""An asyncio front for the engine, for servers: one background thread steps the engine, and each request's
outputs arrive on its own asyncio queue.

    aengine = AsyncEngine(engine).start()
    async for out in aengine.generate(prompt_ids, params):    # RequestOutput deltas as they are produced
        send(out.text)
    aengine.stop()

Leaving the `async for` early (the client disconnected, the task was cancelled) aborts the request, which frees its
KV blocks before the engine's next step. The Engine itself is not thread-safe: one lock serialises add_request,
abort and step, so a request added during a step joins at the next one (continuous batching). When nothing is
running the thread sleeps until a request arrives.

Limits: one engine thread per process (the model call holds the lock for a step); outputs of a request are
delivered on the event loop that started it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from infer.engine import Engine, RequestOutput
from infer.sampling import SamplingParams

T = TypeVar("T")


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.error: BaseException | None = None  # what stopped the engine thread, if anything did

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._queues.pop(request_id, None)
            return self.engine.abort(request_id)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Errors of add_request (a full queue, a prompt too long) raise here."""
        if self._thread is None or self.error is not None:
            raise RuntimeError(f"the engine thread is not running{f': {self.error!r}' if self.error else ''}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            rid = self.engine.add_request(prompt_token_ids, params, request_id)
            self._queues[rid] = (loop, queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise RuntimeError("the engine thread failed") from out
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer left early: free the request's blocks now
                self.abort(rid)

    def between_steps(self, fn: Callable[[], T]) -> T:
        """Run fn() on the calling thread while the engine is between steps (holding the step lock): for other
        model calls (a server's prompt scoring) that must not run beside a step. Blocks; call it off the event
        loop (asyncio.to_thread). The batch waits while fn runs."""
        with self._lock:
            return fn()

    def _run(self) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    busy = self.engine.has_unfinished()
                    outputs = self.engine.step() if busy else []
                    batches: dict[asyncio.AbstractEventLoop, list] = {}
                    for o in outputs:
                        target = self._queues.pop(o.request_id, None) if o.finished else \
                            self._queues.get(o.request_id)
                        if target is not None:
                            batches.setdefault(target[0], []).append((target[1], o))
                for loop, items in batches.items():  # one wake-up per loop and step, not one per request
                    loop.call_soon_threadsafe(_deliver, items)
                if not busy:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as e:  # surface the failure to every waiting request instead of hanging them
            self.error = e
            with self._lock:
                for loop, queue in self._queues.values():
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                self._queues.clear()
