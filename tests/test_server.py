"""infer.server over real sockets on 127.0.0.1: websocket streaming, cancel, disconnect, concurrency, bad input,
the page, /health and /metrics. A tiny random model and a bpe_rs tokenizer trained here; the server runs on its own
event loop thread (ServerThread)."""

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from infer.engine import Engine
from infer.openai_api import render_chat
from infer.sampling import SamplingParams
from infer.server import Server, ServerConfig, ServerThread
from tests.test_engine import make_model, tok  # noqa: F401  (tok is a fixture)


def quiet(_msg):
    pass


def small_config(**kw) -> ServerConfig:
    base = dict(port=0, block_size=8, num_blocks=256, max_num_seqs=64, max_waiting=64, max_message_chars=400,
                max_total_chars=2000, max_messages=8, max_tokens=64, default_max_tokens=16, max_frame_bytes=4096,
                max_body_bytes=8192)
    base.update(kw)
    return ServerConfig(**base)


@pytest.fixture(scope="module")
def model(tok):  # noqa: F811
    return make_model(tok)


@pytest.fixture(scope="module")
def served(tok, model):  # noqa: F811
    st = ServerThread(Server(small_config(), lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        yield server


def ws_url(server, path="/ws"):
    return f"ws://127.0.0.1:{server.port}{path}"


def recv_json(ws, timeout=30):
    return json.loads(ws.recv(timeout=timeout))


def run_generation(ws, rid, messages, params=None):
    """Send one generate; return (frames of that id up to done/error)."""
    msg = {"type": "generate", "id": rid, "messages": messages}
    if params is not None:
        msg["params"] = params
    ws.send(json.dumps(msg))
    frames = []
    while True:
        f = recv_json(ws)
        frames.append(f)
        if f["type"] in ("done", "error"):
            return frames


def http_get(server, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read(), dict(r.getheaders())


def expected_text(server, messages, max_tokens):
    engine = Engine(server.model, server.tokenizer, block_size=8, num_blocks=64, log=quiet)
    ids = render_chat(server.tokenizer, messages)
    return engine.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens))[0]


def joined(frames):
    """Deltas and tool calls in order: the engine's text (special tokens are not shown)."""
    return "".join(f.get("text", f.get("code", "")) for f in frames if f["type"] in ("delta", "tool_call"))


def test_ready_stream_and_done(served):
    with connect(ws_url(served)) as ws:
        ready = recv_json(ws)
        assert ready["type"] == "ready" and ready["max_context"] == 96 and ready["tools"] is False
        assert ready["limits"] == {"max_messages": 8, "max_message_chars": 400, "max_tokens": 64}
        messages = [{"role": "user", "content": "wrap this text"}]
        frames = run_generation(ws, "a1", messages, {"temperature": 0, "max_tokens": 12})
        done = frames[-1]
        assert done["type"] == "done" and done["id"] == "a1" and done["finish_reason"] in ("stop", "length")
        assert all(f["id"] == "a1" for f in frames)
        exp = expected_text(served, messages, 12)
        assert joined(frames) == exp.text
        u = done["usage"]
        assert u["prompt_tokens"] == len(render_chat(served.tokenizer, messages))
        assert u["completion_tokens"] == len(exp.token_ids) and 0 < u["ttft_s"] <= u["total_s"]


def test_cancel_gives_abort_and_frees_blocks(served):
    with connect(ws_url(served)) as ws:
        recv_json(ws)
        ws.send(json.dumps({"type": "generate", "id": "c1", "messages": [{"role": "user", "content": "go"}],
                            "params": {"temperature": 1.0, "max_tokens": 60, "seed": 1}}))
        ws.send(json.dumps({"type": "cancel", "id": "c1"}))
        while (f := recv_json(ws))["type"] != "done":
            assert f["type"] == "delta"
        assert f["finish_reason"] in ("abort", "stop")  # a very short answer may finish before the cancel lands
        f = run_generation(ws, "c2", [{"role": "user", "content": "x"}], {"max_tokens": 2})[-1]
        assert f["type"] == "done"  # the session goes on
    _wait_idle(served)


def _wait_idle(server, timeout=10):
    deadline = time.monotonic() + timeout
    while server.engine.has_unfinished() or server.engine.block_manager.num_used_blocks:
        assert time.monotonic() < deadline, "requests or KV blocks still held"
        time.sleep(0.01)


def test_disconnect_mid_stream_aborts_and_frees_blocks(served):
    before = served.metrics.requests["abort"]
    with connect(ws_url(served)) as ws:
        recv_json(ws)
        ws.send(json.dumps({"type": "generate", "id": "d1", "messages": [{"role": "user", "content": "long"}],
                            "params": {"temperature": 1.0, "top_k": 0, "max_tokens": 64, "seed": 7}}))
        assert recv_json(ws)["type"] in ("delta", "done")
    engine = served.engine
    _wait_idle(served)
    assert engine.block_manager.num_used_blocks == 0 and engine.scheduler.num_running == 0
    assert served.metrics.requests["abort"] == before + 1


def test_32_concurrent_conversations_match_greedy(served):
    prompts = [[{"role": "user", "content": f"line {i}: wrap text number {i * 7}"}] for i in range(32)]
    engine = Engine(served.model, served.tokenizer, block_size=8, num_blocks=256, log=quiet)
    expected = engine.generate([render_chat(served.tokenizer, m) for m in prompts],
                               SamplingParams(temperature=0, max_tokens=10))

    async def one(i):
        async with aconnect(ws_url(served)) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "generate", "id": f"q{i}", "messages": prompts[i],
                                      "params": {"temperature": 0, "max_tokens": 10}}))
            frames = []
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await ws.recv()))
            return frames

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    for i, (frames, exp) in enumerate(zip(results, expected)):
        assert frames[-1]["type"] == "done", frames[-1]
        assert all(f["id"] == f"q{i}" for f in frames)
        assert joined(frames) == exp.text, i
    _wait_idle(served)


@pytest.mark.parametrize("frame,code,needle", [
    ("not json", "invalid_request", "not valid JSON"),
    ('["a list"]', "invalid_request", "JSON object"),
    ('{"type": "generate", "id": 5}', "invalid_request", "id must be a string"),
    ('{"type": "explode", "id": "x"}', "invalid_request", "type must be"),
    ('{"type": "cancel", "id": "nope"}', "invalid_request", "no running request"),
    ('{"type": "generate", "id": "x", "messages": []}', "invalid_request", "messages"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "robot", "content": "hi"}]}', "invalid_request",
     "messages[0].role"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "  "}]}', "invalid_request",
     "messages[0].content is empty"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "' + "a" * 401 + '"}]}',
     "invalid_request", "max_message_chars=400"),
    ('{"type": "generate", "id": "x", "messages": ' + json.dumps([{"role": r, "content": "hi"} for r in
                                                                   ["user", "assistant"] * 4 + ["user"]]) + '}',
     "invalid_request", "max_messages=8"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "assistant", "content": "hi"}]}', "invalid_request",
     "messages[0].role must be 'user'"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "hi"}], "params": {"temperature": 3}}',
     "invalid_request", "params.temperature"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "hi"}], "params": {"top_p": 0}}',
     "invalid_request", "params.top_p"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "hi"}], "params": {"top_k": -1}}',
     "invalid_request", "params.top_k"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 65}}',
     "invalid_request", "max_tokens must be at most 64"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "hi"}], "params": {"typo": 1}}',
     "invalid_request", "unknown fields ['typo']"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user", "content": "' + "word " * 79 + '"}], '
     '"params": {"max_tokens": 60}}', "context_length", "maximum context length is 96 tokens"),
])
def test_bad_frames_get_errors_and_the_session_goes_on(served, frame, code, needle):
    with connect(ws_url(served)) as ws:
        recv_json(ws)
        ws.send(frame)
        err = recv_json(ws)
        assert err["type"] == "error" and err["code"] == code, err
        assert needle in err["message"], err["message"]
        assert run_generation(ws, "after", [{"role": "user", "content": "ok"}], {"max_tokens": 2})[-1]["type"] == "done"


def test_context_error_names_both_numbers(served):
    with connect(ws_url(served)) as ws:
        recv_json(ws)
        err = run_generation(ws, "big", [{"role": "user", "content": "word " * 79}], {"max_tokens": 60})[-1]
        n = len(render_chat(served.tokenizer, [{"role": "user", "content": "word " * 79}]))
        assert f"{n + 60} were requested ({n} in the prompt, 60 to generate)" in err["message"]


def test_oversize_and_binary_frames(served):
    with connect(ws_url(served), max_size=None) as ws:
        recv_json(ws)
        ws.send("x" * 5000)
        err = recv_json(ws)
        assert err["code"] == "invalid_request" and "5000 bytes, over max_frame_bytes=4096" in err["message"]
        ws.send(b"\x00\x01")
        assert "binary frames" in recv_json(ws)["message"]
        assert run_generation(ws, "z", [{"role": "user", "content": "ok"}], {"max_tokens": 2})[-1]["type"] == "done"


def test_full_queue_is_busy_immediately(tok, model):  # noqa: F811
    cfg = small_config(max_num_seqs=1, max_num_batched_tokens=64, max_waiting=1)
    st = ServerThread(Server(cfg, lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        with connect(ws_url(server)) as ws:
            recv_json(ws)
            for i in range(6):
                ws.send(json.dumps({"type": "generate", "id": f"b{i}", "messages": [{"role": "user", "content": "hi"}],
                                    "params": {"temperature": 1.0, "max_tokens": 40, "seed": i}}))
            t0 = time.monotonic()
            busy, done = [], set()
            while len(done) + len(busy) < 6:
                f = recv_json(ws)
                if f["type"] == "error":
                    assert f["code"] == "busy" and "busy, retry" in f["message"]
                    busy.append(time.monotonic() - t0)
                elif f["type"] == "done":
                    done.add(f["id"])
            assert busy and min(busy) < 2.0  # refused at once, not after the running request
            assert len(done) >= 2 and len(done) + len(busy) == 6


def test_health_goes_503_to_200_and_ws_waits(tok, model):  # noqa: F811
    gate = threading.Event()

    def load():
        gate.wait(30)
        return model, tok

    st = ServerThread(Server(small_config(), load, log=quiet))
    with st as server:
        status, body, _ = http_get(server, "/health")
        assert status == 503 and "loading" in json.loads(body)["error"]["message"]
        with pytest.raises(InvalidStatus) as e:
            connect(ws_url(server))
        assert e.value.response.status_code == 503
        gate.set()
        st.wait_ready()
        assert http_get(server, "/health")[0] == 200


def test_failed_load_keeps_503_with_the_reason():
    def load():
        raise FileNotFoundError("no model.safetensors in /nowhere")

    st = ServerThread(Server(small_config(), load, log=quiet))
    with st as server:
        deadline = time.monotonic() + 10
        while server.load_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body, _ = http_get(server, "/health")
        assert status == 503 and "/nowhere" in json.loads(body)["error"]["message"]


def test_metrics_content(served):
    with connect(ws_url(served)) as ws:
        recv_json(ws)
        run_generation(ws, "m", [{"role": "user", "content": "count"}], {"temperature": 0, "max_tokens": 5})
    status, body, headers = http_get(served, "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in ("infer_requests_running", "infer_requests_waiting", "infer_kv_blocks_used"):
        assert name in values
    assert values["infer_kv_blocks_total"] == 256
    assert values["infer_prompt_tokens_total"] > 0 and values["infer_generation_tokens_total"] > 0
    assert values['infer_requests_total{finish_reason="abort"}'] >= 0
    assert values['infer_requests_total{finish_reason="stop"}'] + values['infer_requests_total{finish_reason="length"}'] >= 1
    assert values["infer_ttft_seconds_count"] >= 1 and values['infer_ttft_seconds_bucket{le="+Inf"}'] >= 1
    assert values["infer_itl_seconds_count"] >= 1


def test_web_page_and_missing_page(served, tok, model, tmp_path):  # noqa: F811
    status, body, headers = http_get(served, "/")
    page = served.cfg.web_page
    if page.exists():
        assert status == 200 and body == page.read_bytes() and headers["Content-Type"].startswith("text/html")
    cfg = small_config(web_page=tmp_path / "absent.html")
    with ServerThread(Server(cfg, lambda: (model, tok), log=quiet)) as server:
        status, body, _ = http_get(server, "/")
        assert status == 404 and b"absent.html" in body


def test_api_key_on_http_and_ws(tok, model):  # noqa: F811
    st = ServerThread(Server(small_config(api_key="s3cret"), lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        assert http_get(server, "/v1/models")[0] == 401
        assert http_get(server, "/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
        assert http_get(server, "/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
        assert http_get(server, "/health")[0] == 200
        with pytest.raises(InvalidStatus) as e:
            connect(ws_url(server))
        assert e.value.response.status_code == 401
        with connect(ws_url(server, "/ws?key=s3cret")) as ws:
            assert recv_json(ws)["type"] == "ready"


def test_tools_restrict_origins(tok, model):  # noqa: F811
    st = ServerThread(Server(small_config(tools=True), lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        own = f"http://127.0.0.1:{server.port}"
        status, _, headers = http_get(server, "/v1/models", {"Origin": own})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == own
        assert http_get(server, "/v1/models", {"Origin": "http://evil.example"})[0] == 403
        assert http_get(server, "/v1/models", {"Host": "evil.example", "Origin": "http://evil.example"})[0] == 403
        with pytest.raises(InvalidStatus):
            connect(ws_url(server), origin="http://evil.example")
        with connect(ws_url(server), origin=own) as ws:
            assert recv_json(ws)["tools"] is True
    # without --tools any origin may call the API
    status, _, headers = http_get_any(tok, model, {"Origin": "http://elsewhere.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"


def http_get_any(tok, model, headers):  # noqa: F811
    st = ServerThread(Server(small_config(), lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        return http_get(server, "/v1/models", headers)


def test_oversize_head_and_body_and_garbage(served):
    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    assert raw(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    big = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 9000\r\n\r\n"
    resp = raw(big)
    assert resp.startswith(b"HTTP/1.1 413") and b"max_body_bytes=8192" in resp
    assert raw(b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert http_get(served, "/nope")[0] == 404
    assert http_get(served, "/v1/chat/completions")[0] == 405
    assert http_get(served, "/health")[0] == 200  # still serving


def test_pings_keep_an_idle_socket_alive_and_a_silent_peer_is_dropped(tok, model):  # noqa: F811
    cfg = small_config(ping_interval_s=0.2, ping_timeout_s=0.3)
    st = ServerThread(Server(cfg, lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        # A real client answers the pings itself: after 10 ping intervals of silence it still chats.
        with connect(ws_url(server)) as ws:
            assert recv_json(ws)["type"] == "ready"
            time.sleep(2.0)
            frames = run_generation(ws, "late", [{"role": "user", "content": "still there?"}], {"max_tokens": 4})
            assert frames[-1]["type"] == "done"
        # A peer that never answers (a raw socket that completed the handshake) is closed with 1011.
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 101")
        body = data.split(b"\r\n\r\n", 1)[1]
        opcodes, close_code = [], None
        while len(body) >= 2:  # server frames are unmasked; every frame here is short (< 126 bytes)
            opcode, n = body[0] & 0x0F, body[1] & 0x7F
            if n >= 126:  # the ready frame can be longer: 16-bit length
                n, head = int.from_bytes(body[2:4], "big"), 4
            else:
                head = 2
            payload, body = body[head:head + n], body[head + n:]
            opcodes.append(opcode)
            if opcode == 0x8:
                close_code = int.from_bytes(payload[:2], "big")
        assert 0x9 in opcodes and close_code == 1011, (opcodes, close_code)  # pinged, then dropped
