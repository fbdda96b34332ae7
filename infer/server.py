"""`python -m infer.server`: the web page, websocket streaming chat and the OpenAI-compatible HTTP API on one port.

    python -m infer.server                                    # newest checkpoint under $FLASHCHAT_BASE_DIR, :8000
    python -m infer.server --checkpoint DIR --tokenizer DIR --port 8080 --tools --api-key SECRET

Routes: GET / (infer/web/index.html), GET /ws (websocket upgrade), GET /health, GET /metrics, GET /v1/models,
POST /v1/chat/completions, POST /v1/completions. The websocket protocol (ready / generate / cancel / delta /
tool_call / tool_result / done / error frames) is in `WsSession`'s docstring.

Design — one port for HTTP and websocket: the `websockets` library's own server parses only bodiless GET
requests (its process_request hook cannot read a POST body), so the front door is a small asyncio HTTP/1.1
server (`asyncio.start_server`): it reads the request head (bounded by max_header_bytes) and the body (by
Content-Length, bounded by max_body_bytes), answers HTTP itself (keep-alive; SSE as chunked transfer encoding),
and hands a GET /ws upgrade to websockets' Sans-I/O `ServerProtocol`: the head's bytes are fed to it, it checks
the handshake and builds the 101 response, and from then on it parses and serializes frames (masking, fragments,
close handshake, ping/pong) while we move bytes between it and the socket. No second port, no private APIs.

Engine: one AsyncEngine (infer/async_engine.py) thread steps the engine; every request (ws or HTTP) is one
AsyncEngine.generate stream, so all of them share continuous batching. A full waiting queue (QueueFullError) is
answered at once: a "busy" error frame on ws, 503 + Retry-After on HTTP. A closed socket, a cancel frame or an
HTTP client that disconnects (polled every 50 ms while its request runs) cancels the stream, which aborts the
request and frees its KV blocks before the engine's next step.

Health: the port opens first; the model loads and warms up (one 1-token generation) in the background. Until
then /health, /v1/* and /ws answer 503 "loading"; a failed load keeps 503 with the error's text.

Security: `--api-key`: HTTP requests to /v1/* and /metrics need `Authorization: Bearer KEY`; the websocket needs
`/ws?key=KEY` (browsers cannot set headers on a websocket) or the same header. / and /health stay open (the page
holds no secret). CORS: without --tools any origin may call the API (Access-Control-Allow-Origin: *). With
--tools (model-written Python runs in infer/sandbox.py) only the server's own origin may: a request with an
Origin header other than http(s)://<Host> is refused with 403 (websocket included: browsers do not apply CORS to
websockets), and the Host must name this server (its bind address, localhost, 127.0.0.1 or [::1]) so a
DNS-rebinding page cannot pass as same-origin. Only model-written code reaches the sandbox: client messages are
rendered as text (model/chat.py encodes user text as ordinary tokens), never executed.

Size: over the house 500 lines because the HTTP front door, the websocket session and the OpenAI handlers share
the server state and the request tracking (`_Tracked`); what separates cleanly lives in infer/openai_api.py
(validation, response shapes, prompt logprobs) and infer/metrics.py.

Limits: HTTP/1.1 without chunked request bodies (411) or pipelining; no TLS (put a proxy in front); one model;
completions' prompt logprobs run one dense forward per prompt between engine steps (the batch waits for it).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from infer import openai_api as api
from infer.async_engine import AsyncEngine
from infer.engine import Engine, RequestOutput
from infer.metrics import ServerMetrics
from infer.openai_api import ApiError
from infer.sampling import SamplingParams
from infer.scheduler import QueueFullError

WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"
STATUS_OF = {"invalid_request": 400, "context_length": 400, "busy": 503, "internal": 500}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = an ephemeral port (tests)
    model_name: str = "flashchat"
    api_key: str | None = None
    tools: bool = False  # run <|python_start|> calls in the sandbox (restricts CORS to the server's origin)
    # Request limits (nanochat's old server's, serving conventions §1.5); every error quotes the one it hit.
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_tokens: int = 4096  # the largest max_tokens a request may ask for (the context may allow fewer)
    default_max_tokens: int = 512  # when a chat request gives none (capped by the room left in the context)
    max_body_bytes: int = 1 << 20  # HTTP request body
    max_frame_bytes: int = 1 << 20  # websocket message; 4x this closes the socket (1009) instead of an error frame
    max_header_bytes: int = 16384
    ping_interval_s: float = 20.0  # websocket pings keep idle sockets (and proxies) alive
    ping_timeout_s: float = 20.0
    # Engine sizing (infer/engine.py's knobs)
    block_size: int = 16
    num_blocks: int | None = None  # None: from free GPU memory, or the CPU token budget
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 256
    web_page: Path = field(default=WEB_PAGE)


class _Tracked:
    """One engine request with its timings and metrics: `async for out in tracked.outputs()`. QueueFullError and
    add_request's ValueError become ApiErrors; leaving early aborts the request (finish reason "abort")."""

    def __init__(self, server: Server, ids: list[int], params: SamplingParams):
        self.server, self.ids, self.params = server, ids, params
        self.request_id = f"req-{uuid.uuid4().hex[:16]}"
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0
        self.ttft_s: float | None = None
        self.total_s = 0.0
        self.finish_reason: str | None = None

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        metrics = self.server.metrics
        start = last = time.monotonic()
        stream = self.server.aengine.generate(self.ids, self.params, self.request_id)
        admitted = False
        try:
            try:
                out = await anext(stream)
            except QueueFullError as e:
                raise ApiError("busy", f"{e}") from None
            except ValueError as e:  # prompt + max_tokens over the KV pool, or ids outside the vocabulary
                raise ApiError("invalid_request", str(e)) from None
            admitted = True
            while True:
                now = time.monotonic()
                sampled = sum(out.mask)
                if sampled:
                    if self.ttft_s is None:
                        self.ttft_s = now - start
                        metrics.on_first_token(self.ttft_s)
                    else:
                        metrics.on_token(now - last)
                    last = now
                    self.completion_tokens += sampled
                if out.finished:
                    self.finish_reason = out.finish_reason
                    self.total_s = now - start
                yield out
                if out.finished:
                    return
                out = await anext(stream)
        finally:
            await stream.aclose()  # a consumer that left early: AsyncEngine aborts the request here
            if self.finish_reason is None:
                self.total_s = time.monotonic() - start
            if admitted:
                reason = self.finish_reason or ("abort" if self.server.aengine.error is None else "error")
                metrics.on_finish(reason, prompt_tokens=self.prompt_tokens,
                                  completion_tokens=self.completion_tokens, total_s=self.total_s)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "ttft_s": self.ttft_s, "total_s": self.total_s}


@dataclass
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    head: bytes  # the raw request head (handed to the websocket protocol on an upgrade)
    body: bytes = b""


class Server:
    """The server: `await start()` (listens, then loads + warms up in the background), `await close()`.
    `load()` returns (model, tokenizer) and runs on a worker thread."""

    def __init__(self, cfg: ServerConfig, load: Callable[[], tuple], log: Callable[[str], None] = print):
        self.cfg, self._load_fn, self.log = cfg, load, log
        self.metrics = ServerMetrics()
        self.engine: Engine | None = None
        self.aengine: AsyncEngine | None = None
        self.model = self.tokenizer = None
        self.tools = None
        self.ready = False
        self.load_error: str | None = None
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self.created = int(time.time())

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    @property
    def max_context(self) -> int:
        return self.engine.max_model_len

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._on_connection, self.cfg.host, self.cfg.port,
                                                  limit=self.cfg.max_header_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loader = asyncio.create_task(self._load())
        return self

    async def _load(self) -> None:
        try:
            self.model, self.tokenizer = await asyncio.to_thread(self._load_fn)
            if self.cfg.tools:
                from infer.sandbox import ToolExecutor
                self.tools = ToolExecutor()
            c = self.cfg
            self.engine = Engine(self.model, self.tokenizer, block_size=c.block_size, num_blocks=c.num_blocks,
                                 max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                                 max_waiting=c.max_waiting, tools=self.tools, log=self.log)
            self.aengine = AsyncEngine(self.engine).start()
            async for _ in self.aengine.generate([self.tokenizer.bos_id], SamplingParams(temperature=0, max_tokens=1)):
                pass  # warm-up: the first step pays one-time costs (allocations, kernel selection)
            self.ready = True
            self.log(f"ready: {self.cfg.model_name}, context {self.max_context} tokens")
        except Exception as e:  # keep serving /health with the reason instead of dying silently
            self.load_error = f"{type(e).__name__}: {e}"
            self.log(f"model load failed: {self.load_error}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._loader.cancel()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self.aengine is not None:
            await asyncio.to_thread(self.aengine.stop)
        if self.tools is not None:
            self.tools.shutdown(wait=False)

    # ---- HTTP front door ---------------------------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            while True:
                req = await self._read_request(reader, writer)
                if req is None:
                    return
                if req.path == "/ws":
                    await WsSession(self, reader, writer).run(req)
                    return
                keep_alive = req.headers.get("connection", "").lower() != "close"
                await self._respond(req, reader, writer, keep_alive)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing; ending quietly keeps asyncio from logging the cancelled handler
        finally:
            self._conns.discard(task)
            writer.close()

    async def _read_request(self, reader, writer) -> HttpRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the client closed the connection between requests
        except asyncio.LimitOverrunError:
            await self._send_error(writer, 431, "invalid_request", f"request head is over max_header_bytes="
                                   f"{self.cfg.max_header_bytes}", None, keep_alive=False)
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                parts = []
                break
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._send_error(writer, 400, "invalid_request", "malformed HTTP request", None, keep_alive=False)
            return None
        url = urlsplit(parts[1])
        req = HttpRequest(parts[0], url.path, parse_qs(url.query), headers, head)
        if "transfer-encoding" in headers:
            await self._send_error(writer, 411, "invalid_request", "chunked request bodies are not supported: send "
                                   "Content-Length", None, keep_alive=False)
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            await self._send_error(writer, 400, "invalid_request", "bad Content-Length", None, keep_alive=False)
            return None
        if length > self.cfg.max_body_bytes:
            await self._send_error(writer, 413, "invalid_request", f"request body is {length} bytes, over "
                                   f"max_body_bytes={self.cfg.max_body_bytes}", None, keep_alive=False)
            return None
        req.body = await reader.readexactly(length)
        return req

    def _origin_headers(self, req: HttpRequest) -> dict[str, str] | None:
        """CORS response headers, or None when the request's origin is refused (see the module docstring)."""
        origin = req.headers.get("origin")
        if not self.cfg.tools:
            return {"Access-Control-Allow-Origin": "*"} if origin else {}
        host = req.headers.get("host", "")
        hostname = urlsplit(f"//{host}").hostname or ""
        own = {self.cfg.host, "localhost", "127.0.0.1", "::1"}
        if self.cfg.host not in ("0.0.0.0", "::") and hostname not in own:
            return None
        if origin is None:
            return {}
        if origin not in (f"http://{host}", f"https://{host}"):
            return None
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def _authorized(self, req: HttpRequest, allow_query: bool = False) -> bool:
        if self.cfg.api_key is None:
            return True
        given = req.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else ""
        if not given and allow_query:
            given = (req.query.get("key") or [""])[0]
        return hmac.compare_digest(given.encode(), self.cfg.api_key.encode())

    async def _respond(self, req: HttpRequest, reader, writer, keep_alive: bool) -> None:
        cors = self._origin_headers(req)
        if cors is None:
            return await self._send_error(writer, 403, "invalid_request", "cross-origin requests are refused "
                                          "while the python tool is on (--tools)", None, keep_alive)
        routes = {("GET", "/"): self._page, ("GET", "/health"): self._health, ("GET", "/metrics"): self._metrics,
                  ("GET", "/v1/models"): self._models, ("POST", "/v1/chat/completions"): self._chat,
                  ("POST", "/v1/completions"): self._completions}
        if req.method == "OPTIONS":
            cors.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                         "Access-Control-Allow-Headers": "Authorization, Content-Type"})
            return await self._send(writer, 204, b"", "text/plain", cors, keep_alive)
        handler = routes.get((req.method, req.path))
        if handler is None:
            known = any(path == req.path for _, path in routes)
            status = 405 if known else 404
            msg = f"{req.method} is not allowed on {req.path}" if known else f"no route {req.method} {req.path}"
            return await self._send_error(writer, status, "invalid_request", msg, None, keep_alive, cors)
        if (req.path.startswith("/v1/") or req.path == "/metrics") and not self._authorized(req):
            return await self._send_error(writer, 401, "invalid_request", "missing or wrong API key: send "
                                          "'Authorization: Bearer KEY'", None, keep_alive, cors)
        if req.path.startswith("/v1/") and not self.ready:
            return await self._send_error(writer, 503, "busy", self._loading_message(), None, keep_alive, cors)
        if req.method == "POST":
            return await self._until_disconnect(reader, self._post(handler, req, writer, keep_alive, cors))
        status, body, ctype = handler(req)
        await self._send(writer, status, body, ctype, cors, keep_alive)

    async def _post(self, handler, req, writer, keep_alive, cors) -> None:
        try:
            body = json.loads(req.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return await self._send_error(writer, 400, "invalid_request", f"body is not valid JSON: {e}", None,
                                          keep_alive, cors)
        if not isinstance(body, dict):
            return await self._send_error(writer, 400, "invalid_request", "body must be a JSON object", None,
                                          keep_alive, cors)
        try:
            await handler(body, writer, keep_alive, cors)
        except ApiError as e:
            await self._send_error(writer, STATUS_OF[e.code], e.code, e.message, e.param, keep_alive, cors)

    @staticmethod
    async def _until_disconnect(reader: asyncio.StreamReader, work) -> None:
        """Run `work`; cancel it (aborting its engine requests) if the client closes the connection meanwhile."""
        task = asyncio.ensure_future(work)
        while not task.done():
            await asyncio.wait([task], timeout=0.05)
            if reader.at_eof() and not task.done():
                task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()

    def _loading_message(self) -> str:
        if self.load_error:
            return f"the model failed to load: {self.load_error}"
        return "the model is loading, retry shortly"

    # ---- responses ---------------------------------------------------------------------------------------------
    @staticmethod
    async def _send(writer, status: int, body: bytes, ctype: str, headers: dict, keep_alive: bool) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _send_json(self, writer, status: int, obj, headers: dict, keep_alive: bool) -> None:
        await self._send(writer, status, json.dumps(obj).encode(), "application/json", headers, keep_alive)

    async def _send_error(self, writer, status: int, code: str, message: str, param, keep_alive: bool,
                          headers: dict | None = None) -> None:
        headers = dict(headers or {})
        if status == 503:
            headers["Retry-After"] = "1"
        await self._send_json(writer, status, api.error_body(code, message, param), headers, keep_alive)

    def _page(self, req):
        path = self.cfg.web_page
        try:
            return 200, path.read_bytes(), "text/html; charset=utf-8"
        except FileNotFoundError:
            return 404, f"web page not found: {path} is missing from this install\n".encode(), "text/plain"
        except OSError as e:
            return 500, f"web page {path} cannot be read: {e}\n".encode(), "text/plain"

    def _health(self, req):
        if self.ready and (self.aengine.error is None):
            return 200, b'{"status": "ok"}', "application/json"
        message = self._loading_message() if not self.ready else f"engine failed: {self.aengine.error!r}"
        return 503, json.dumps({"error": {"code": 503, "message": message}}).encode(), "application/json"

    def _metrics(self, req):
        return 200, self.metrics.render(self.engine).encode(), "text/plain; version=0.0.4; charset=utf-8"

    def _models(self, req):
        model = {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "flashchat",
                 "max_model_len": self.max_context}
        return 200, json.dumps({"object": "list", "data": [model]}).encode(), "application/json"

    # ---- OpenAI endpoints --------------------------------------------------------------------------------------
    async def _sse(self, writer, cors: dict, keep_alive: bool, events: AsyncIterator[dict]) -> None:
        """Stream `data: {json}\\n\\n` events as chunked transfer encoding, then `data: [DONE]`."""
        head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache",
                "Transfer-Encoding: chunked", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        head += [f"{k}: {v}" for k, v in cors.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

        def chunk(payload: str) -> bytes:
            data = f"data: {payload}\n\n".encode()
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        async for ev in events:
            writer.write(chunk(json.dumps(ev)))
            await writer.drain()
        writer.write(chunk("[DONE]") + b"0\r\n\r\n")
        await writer.drain()

    def _chat_request(self, body: dict) -> _Tracked:
        api.reject_unsupported(body)
        messages = api.validate_messages(body.get("messages"), self.cfg)
        ids = api.render_chat(self.tokenizer, messages)
        fields = dict(body)
        if fields.get("max_tokens") is None and fields.get("max_completion_tokens") is not None:
            fields["max_tokens"] = fields["max_completion_tokens"]
        params = api.sampling_params(fields, self.cfg, prompt_len=len(ids), max_context=self.max_context,
                                     stop=api.stop_strings(body))
        return _Tracked(self, ids, params)

    async def _chat(self, body: dict, writer, keep_alive: bool, cors: dict) -> None:
        stream = _flag(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError("invalid_request", "stream_options must be an object", "stream_options")
        include_usage = _flag(options, "include_usage", "stream_options.include_usage")
        req = self._chat_request(body)
        rid, created, name = f"chatcmpl-{req.request_id[4:]}", int(time.time()), self.cfg.model_name
        outputs = req.outputs()
        first = await anext(outputs)  # busy / invalid errors surface here, before any header is sent
        if not stream:
            pieces = [first.text]
            async for out in outputs:
                pieces.append(out.text)
            use = api.usage(req.prompt_tokens, req.completion_tokens)
            return await self._send_json(writer, 200, api.chat_completion(rid, created, name, "".join(pieces),
                                                                          req.finish_reason, use), cors, keep_alive)

        async def events():
            yield api.chat_chunk(rid, created, name, {"role": "assistant", "content": ""})
            out = first
            while True:
                if out.text:
                    yield api.chat_chunk(rid, created, name, {"content": out.text})
                if out.finished:
                    yield api.chat_chunk(rid, created, name, {}, out.finish_reason)
                    break
                out = await anext(outputs)
            if include_usage:
                yield api.chat_chunk(rid, created, name, {}, use=api.usage(req.prompt_tokens, req.completion_tokens))

        try:
            await self._sse(writer, cors, keep_alive, events())
        finally:
            await outputs.aclose()

    async def _completions(self, body: dict, writer, keep_alive: bool, cors: dict) -> None:
        api.reject_unsupported(body)
        V = self.model.config.vocab_size
        prompts = api.completion_prompts(self.tokenizer, body.get("prompt"), V)
        echo = _flag(body, "echo")
        stream = _flag(body, "stream")
        top_n = body.get("logprobs")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)
                                  or not 0 <= top_n <= api.MAX_LOGPROBS):
            raise ApiError("invalid_request", f"logprobs must be an integer in [0, {api.MAX_LOGPROBS}], got "
                           f"{top_n!r}", "logprobs")
        max_tokens = body.get("max_tokens", 16)  # OpenAI's default for this endpoint
        if stream and (echo or top_n is not None or len(prompts) > 1):
            raise ApiError("invalid_request", "stream supports one prompt without echo or logprobs", "stream")
        rid, created, name = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time()), self.cfg.model_name
        if max_tokens == 0:
            if not echo:
                raise ApiError("invalid_request", "max_tokens 0 needs echo: true (score the prompt only)",
                               "max_tokens")
            choices = []
            for i, (ids, text) in enumerate(prompts):
                api.check_context(len(ids), 0, self.max_context)
                lp = await self._prompt_logprobs(ids, top_n) if top_n is not None else None
                choices.append(api.completion_choice(i, text, "length", lp))
            use = api.usage(sum(len(p) for p, _ in prompts), 0)
            return await self._send_json(writer, 200, api.completion(rid, created, name, choices, use), cors,
                                         keep_alive)
        reqs = [_Tracked(self, ids, api.sampling_params({**body, "max_tokens": max_tokens}, self.cfg,
                                                        prompt_len=len(ids), max_context=self.max_context,
                                                        stop=api.stop_strings(body), logprobs=top_n is not None))
                for ids, _ in prompts]
        if stream:
            outputs = reqs[0].outputs()
            first = await anext(outputs)

            async def events():
                out = first
                while True:
                    yield api.completion(rid, created, name, [api.completion_choice(
                        0, out.text, out.finish_reason if out.finished else None, None)], None)
                    if out.finished:
                        return
                    out = await anext(outputs)

            try:
                return await self._sse(writer, cors, keep_alive, events())
            finally:
                await outputs.aclose()
        tasks = [asyncio.ensure_future(self._collect(r)) for r in reqs]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:  # one prompt failed (busy, invalid): abort the others rather than let them run on
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        choices = []
        for i, ((ids, ptext), req, (toks, text, lps)) in enumerate(zip(prompts, reqs, results)):
            lp = None
            if top_n is not None:
                gen_tops = [{t: v} for t, v in zip(toks, lps)]
                if echo:
                    p_lps, p_tops = await self._prompt_logprobs_raw(ids, top_n)
                    lp = api.logprobs_object(self.tokenizer, ids + toks, p_lps + lps, p_tops + gen_tops)
                else:
                    lp = api.logprobs_object(self.tokenizer, toks, lps, gen_tops)
            choices.append(api.completion_choice(i, (ptext if echo else "") + text, req.finish_reason, lp))
        use = api.usage(sum(r.prompt_tokens for r in reqs), sum(r.completion_tokens for r in reqs))
        await self._send_json(writer, 200, api.completion(rid, created, name, choices, use), cors, keep_alive)

    @staticmethod
    async def _collect(req: _Tracked) -> tuple[list[int], str, list[float]]:
        toks, text, lps = [], [], []
        async for out in req.outputs():
            toks += out.token_ids
            text.append(out.text)
            lps += out.logprobs if out.logprobs is not None else [None] * len(out.token_ids)  # forced: no logprob
        return toks, "".join(text), lps

    async def _prompt_logprobs_raw(self, ids: list[int], top_n: int):
        def run():
            return api.prompt_logprobs(self.model, ids, top_n)
        return await asyncio.to_thread(self.aengine.between_steps, run)

    async def _prompt_logprobs(self, ids: list[int], top_n: int) -> dict:
        lps, tops = await self._prompt_logprobs_raw(ids, top_n)
        return api.logprobs_object(self.tokenizer, ids, lps, tops)


def _flag(body: dict, key: str, name: str | None = None) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError("invalid_request", f"{name or key} must be true or false, got {v!r}", name or key)
    return v


class WsSession:
    """One websocket = one conversation session (the fixed protocol; all frames are JSON text with a "type").

    server → client on connect: {"type": "ready", "model", "max_context", "tools", "limits": {"max_messages",
        "max_message_chars", "max_tokens"}}
    client → server: {"type": "generate", "id": str, "messages": [{"role", "content"}, ...], "params": {...}}
        (params optional: temperature, top_k, top_p, min_p, max_tokens, seed); {"type": "cancel", "id": str}
    server → client: {"type": "delta", "id", "text"}; {"type": "tool_call", "id", "code"} when the model closed
        a python call; {"type": "tool_result", "id", "output"} (with --tools); {"type": "done", "id",
        "finish_reason": "stop"|"length"|"abort", "usage": {"prompt_tokens", "completion_tokens", "ttft_s",
        "total_s"}}; {"type": "error", "id": str|null, "code": "invalid_request"|"busy"|"context_length"|
        "internal", "message": str naming the field}.
    A session may run several generations at once (distinct ids). Closing the socket aborts them all. The text of
    a python call goes in its tool_call frame, not in deltas.
    """

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        from websockets.server import ServerProtocol

        self.server, self.cfg, self.reader, self.writer = server, server.cfg, reader, writer
        self.protocol = ServerProtocol(max_size=4 * self.cfg.max_frame_bytes)
        self.tasks: dict[str, tuple[asyncio.Task, _Tracked]] = {}  # running generations by client id
        self.last_pong = time.monotonic()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof():
                self.writer.write_eof()

    async def send(self, obj: dict) -> None:
        from websockets.protocol import State

        if self.protocol.state is State.OPEN:
            self.protocol.send_text(json.dumps(obj).encode())
            self._flush()
            await self.writer.drain()

    async def error(self, rid, code: str, message: str) -> None:
        await self.send({"type": "error", "id": rid, "code": code, "message": message})

    async def run(self, req: HttpRequest) -> None:
        from websockets.frames import Opcode

        p = self.protocol
        p.receive_data(req.head)
        handshake = p.events_received()[0]
        refusal = None
        if self.server._origin_headers(req) is None:
            refusal = (403, "cross-origin websocket refused while the python tool is on (--tools)\n")
        elif not self.server._authorized(req, allow_query=True):
            refusal = (401, "missing or wrong API key: connect to /ws?key=KEY\n")
        elif not self.server.ready:
            refusal = (503, self.server._loading_message() + "\n")
        p.send_response(p.reject(*refusal) if refusal else p.accept(handshake))
        self._flush()
        await self.writer.drain()
        if refusal or p.handshake_exc is not None:
            return
        c = self.cfg
        await self.send({"type": "ready", "model": c.model_name, "max_context": self.server.max_context,
                         "tools": c.tools, "limits": {"max_messages": c.max_messages,
                                                      "max_message_chars": c.max_message_chars,
                                                      "max_tokens": min(c.max_tokens, self.server.max_context - 1)}})
        pinger = asyncio.create_task(self._ping())
        parts: list[bytes] = []
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    p.receive_eof()
                    break
                p.receive_data(data)
                for frame in p.events_received():
                    if frame.opcode is Opcode.PONG:
                        self.last_pong = time.monotonic()
                    elif frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                        if frame.opcode is not Opcode.CONT:
                            parts = [bytes([frame.opcode])]
                        parts.append(frame.data)
                        if frame.fin:
                            await self._on_message(parts[0][0] == Opcode.TEXT, b"".join(parts[1:]))
                            parts = []
                self._flush()
                if p.close_expected() or p.state.name == "CLOSED":
                    break
        except ConnectionError:
            pass
        finally:
            pinger.cancel()
            tasks = [task for task, _ in self.tasks.values()]
            for task in tasks:
                task.cancel()  # the socket is gone: abort every request of this session
            await asyncio.gather(pinger, *tasks, return_exceptions=True)
            self._flush()

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.ping_interval_s)
            if time.monotonic() - self.last_pong > self.cfg.ping_interval_s + self.cfg.ping_timeout_s:
                self.protocol.send_close(1011, "ping timeout")
                self._flush()
                self.writer.close()
                return
            self.protocol.send_ping(os.urandom(4))
            self._flush()

    async def _on_message(self, is_text: bool, data: bytes) -> None:
        if len(data) > self.cfg.max_frame_bytes:
            return await self.error(None, "invalid_request", f"frame is {len(data)} bytes, over max_frame_bytes="
                                    f"{self.cfg.max_frame_bytes}")
        if not is_text:
            return await self.error(None, "invalid_request", "binary frames are not supported: send JSON text")
        try:
            msg = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return await self.error(None, "invalid_request", f"frame is not valid JSON: {e}")
        if not isinstance(msg, dict):
            return await self.error(None, "invalid_request", "frame must be a JSON object with a 'type'")
        rid = msg.get("id")
        if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
            return await self.error(rid if isinstance(rid, str) else None, "invalid_request",
                                    f"id must be a string of 1 to 128 characters, got {rid!r}")
        kind = msg.get("type")
        if kind == "cancel":
            running = self.tasks.pop(rid, None)
            if running is None:
                return await self.error(rid, "invalid_request", f"id: no running request {rid!r} to cancel")
            task, req = running
            task.cancel()  # aborts the engine request (a task that never started never added one)
            await asyncio.gather(task, return_exceptions=True)
            if task.cancelled():  # else it finished first and already sent its done frame
                await self.send({"type": "done", "id": rid, "finish_reason": "abort", "usage": req.usage()})
            return
        if kind != "generate":
            return await self.error(rid, "invalid_request", f"type must be 'generate' or 'cancel', got {kind!r}")
        if rid in self.tasks:
            return await self.error(rid, "invalid_request", f"id: request {rid!r} is already running")
        try:
            messages = api.validate_messages(msg.get("messages"), self.cfg)
            ids = api.render_chat(self.server.tokenizer, messages)
            params = api.sampling_params(msg.get("params") or {}, self.cfg, prompt_len=len(ids),
                                         max_context=self.server.max_context, strict=True, where="params")
        except ApiError as e:
            return await self.error(rid, e.code, e.message)
        req = _Tracked(self.server, ids, params)
        self.tasks[rid] = (asyncio.create_task(self._generate(rid, req)), req)

    async def _generate(self, rid: str, req: _Tracked) -> None:
        tok = self.server.tokenizer
        py_start = tok.special_tokens.get("<|python_start|>")
        py_end = tok.special_tokens.get("<|python_end|>")
        specials = set(tok.special_tokens.values())
        code: list[int] | None = None  # token ids of an open python call
        try:
            async for out in req.outputs():
                if out.tool_output is not None:
                    await self.send({"type": "tool_result", "id": rid, "output": out.tool_output})
                    continue
                token = out.token_ids[0] if out.token_ids else None
                if token == py_start:
                    if out.text:  # text completed before the call
                        await self.send({"type": "delta", "id": rid, "text": out.text})
                    code = []
                elif code is not None and token == py_end:
                    await self.send({"type": "tool_call", "id": rid, "code": tok.decode(code)})
                    code = None
                elif code is not None:
                    if token is not None and token not in specials:
                        code.append(token)
                elif out.text:
                    await self.send({"type": "delta", "id": rid, "text": out.text})
                if out.finished:
                    if code:  # the answer ended inside an unfinished call: show what was written as text
                        await self.send({"type": "delta", "id": rid, "text": tok.decode(code)})
                    await self.send({"type": "done", "id": rid, "finish_reason": out.finish_reason,
                                     "usage": req.usage()})
        except ApiError as e:
            await self.error(rid, e.code, e.message)
        except ConnectionError:
            pass
        except Exception as e:  # an engine failure: tell this client, keep the session
            await self.error(rid, "internal", f"generation failed: {e}")
        finally:
            if rid in self.tasks and self.tasks[rid][1] is req:
                del self.tasks[rid]


class ServerThread:
    """Run a Server on its own event loop in a daemon thread (tests, benches): `with ServerThread(server) as s:`."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server", daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        return self.server

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.server.ready:
            if self.server.load_error or time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s} s: {self.server.load_error}")
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


# ---- CLI -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a flashchat model: web page, websocket chat, OpenAI API.")
    p.add_argument("--checkpoint", type=Path, help="model directory, checkpoints directory or a stage's run "
                   "directory (default: the latest run under $FLASHCHAT_BASE_DIR, as infer.cli finds it)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the run's)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 = any free one (default: %(default)s)")
    p.add_argument("--tools", action="store_true", help="run the model's python calls in the sandbox "
                   "(restricts CORS and websocket origins to this server)")
    p.add_argument("--api-key", default=os.environ.get("FLASHCHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (websocket: /ws?key=KEY); default $FLASHCHAT_API_KEY")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import bpe_rs

    from infer.cli import find_checkpoint
    from model.io import CheckpointError, load_model

    args = parse_args(argv)
    try:
        ckpt, tok_dir = find_checkpoint(args.checkpoint, args.tokenizer)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def load():
        return load_model(ckpt, device=args.device), bpe_rs.Tokenizer.load(tok_dir)

    cfg = ServerConfig(host=args.host, port=args.port, model_name=f"{ckpt.parents[1].name}/{ckpt.name}"
                       if ckpt.name.startswith("step_") else ckpt.name, api_key=args.api_key,
                       tools=args.tools, max_num_seqs=args.max_num_seqs)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    async def serve() -> None:
        server = await Server(cfg, load, log).start()
        log(f"serving {ckpt} on {server.url}  (web page: {server.url}/, OpenAI API: {server.url}/v1)")
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
