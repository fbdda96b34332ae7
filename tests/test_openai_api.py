"""The OpenAI-compatible HTTP API of infer.server: the official `openai` client unchanged, SSE framing on the wire,
completions with token-id prompts, echo + logprobs (max_tokens 0 included) against the model's own log-softmax,
errors naming the field, and abort when an HTTP client disconnects."""

import http.client
import json
import socket
import time

import openai
import pytest
import torch

from infer.engine import Engine
from infer.openai_api import render_chat
from infer.sampling import SamplingParams
from infer.server import Server, ServerThread
from tests.test_engine import make_model, tok  # noqa: F401  (tok is a fixture)
from tests.test_server import quiet, small_config


@pytest.fixture(scope="module")
def served(tok):  # noqa: F811
    model = make_model(tok)
    st = ServerThread(Server(small_config(model_name="tiny"), lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="unused", max_retries=0)


def greedy(server, ids, max_tokens, logprobs=False):
    engine = Engine(server.model, server.tokenizer, block_size=8, num_blocks=64, log=quiet)
    return engine.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs))[0]


def post(server, path, body, raw=None):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = raw if raw is not None else json.dumps(body).encode()
    c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, r.read(), dict(r.getheaders())


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "wrap this paragraph"}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_non_stream_equals_greedy(served, client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=10)
    exp = greedy(served, render_chat(served.tokenizer, MESSAGES), 10)
    assert r.choices[0].message.content == exp.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == exp.finish_reason
    assert r.usage.prompt_tokens == len(exp.prompt_token_ids) and r.usage.completion_tokens == len(exp.token_ids)


def test_chat_stream_with_usage(served, client):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    exp = greedy(served, render_chat(served.tokenizer, MESSAGES), 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == exp.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [exp.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)


def test_sse_framing_on_the_wire(served):
    s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    body = json.dumps({"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
              b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"Content-Type: text/event-stream" in head and b"Transfer-Encoding: chunked" in head
    payload = b""
    while True:  # undo the chunked transfer encoding
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        payload, rest = payload + rest[:n], rest[n + 2:]
    events = payload.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith("data: ") and json.loads(ev[6:])["object"] == "chat.completion.chunk"


def test_completions_text_and_token_prompts_with_logprobs(served, client):
    tok = served.tokenizer
    ids = [tok.bos_id] + tok.encode_ordinary("def fill(text, width=70):")
    r = client.completions.create(model="tiny", prompt=[ids, "def fill(text, width=70):"], max_tokens=6,
                                  temperature=0, logprobs=1)
    exp = greedy(served, ids, 6, logprobs=True)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    for c in r.choices:  # the text prompt encodes to the same ids (bos + ordinary text)
        assert c.text == exp.text
        assert c.logprobs.token_logprobs == pytest.approx(exp.logprobs, abs=1e-4)
    assert r.usage.prompt_tokens == 2 * len(ids)


def test_echo_logprobs_max_tokens_0_is_the_models_log_softmax(served, client):
    tok = served.tokenizer
    ids = [tok.bos_id] + tok.encode_ordinary("    return w.fill(text)")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        logp = torch.log_softmax(served.model(torch.tensor([ids]), logits_positions="all")[0], dim=-1)
    want = [None] + [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert len(lp.tokens) == len(ids) and lp.tokens[0] == "<|bos|>"
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])  # keyed by text: byte tokens may share '\ufffd'
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert r.choices[0].text == tok.decode(ids) and r.usage.completion_tokens == 0


def test_echo_with_generation_prepends_the_prompt(served, client):
    r = client.completions.create(model="tiny", prompt="class TextWrapper:", max_tokens=3, temperature=0,
                                  echo=True, logprobs=0)
    c = r.choices[0]
    assert c.text.startswith("class TextWrapper:")
    n_prompt = 1 + len(served.tokenizer.encode_ordinary("class TextWrapper:"))
    assert len(c.logprobs.token_logprobs) == n_prompt + r.usage.completion_tokens


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "wizard"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content", "empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature",
     "[0, 2.0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p", "(0, 1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens",
     ">= 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, "n", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream",
     "true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 79}], "max_tokens": 60},
     "max_tokens", "maximum context length is 96 tokens"),
    ("/v1/completions", {"prompt": [5, 100000]}, "prompt", "[0, 400)"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "needs echo"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, "logprobs", "[0, 5]"),
    ("/v1/completions", {"prompt": 12}, "prompt", "prompt must be"),
])
def test_bad_requests_are_400_naming_the_field(served, path, body, param, needle):
    status, data, _ = post(served, path, body)
    err = json.loads(data)["error"]
    assert status == 400 and err["param"] == param and needle in err["message"], err
    assert post(served, "/v1/completions", {"prompt": "ok", "max_tokens": 1})[0] == 200  # still serving


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert "temperature" in str(e.value)


def test_non_json_and_non_object_bodies(served):
    status, data, _ = post(served, "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]["message"]
    status, data, _ = post(served, "/v1/chat/completions", [1, 2])
    assert status == 400 and "JSON object" in json.loads(data)["error"]["message"]


def test_http_disconnect_aborts_the_request(served):
    before = served.metrics.requests["abort"]
    s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    body = json.dumps({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 64, "temperature": 1.0,
                       "seed": 3}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 10
    while not served.engine.has_unfinished():  # wait until it runs, then leave without reading the answer
        assert time.monotonic() < deadline
        time.sleep(0.001)
    s.close()
    while served.engine.has_unfinished() or served.engine.block_manager.num_used_blocks:
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.01)
    assert served.metrics.requests["abort"] == before + 1


def test_a_refused_prompt_aborts_its_siblings(tok):  # noqa: F811
    """A multi-prompt completions request whose later prompts find the queue full answers 503 busy, and the prompts
    it had already admitted are aborted then, not left generating for nobody."""
    model = make_model(tok)
    cfg = small_config(max_num_seqs=1, max_num_batched_tokens=64, max_waiting=1)
    st = ServerThread(Server(cfg, lambda: (model, tok), log=quiet))
    with st as server:
        st.wait_ready()
        before = dict(server.metrics.requests)
        status, data, _ = post(server, "/v1/completions", {"prompt": ["def wrap(", "class Text", "import os", "x = "],
                                                           "max_tokens": 64, "temperature": 1.0, "seed": 1})
        assert status == 503 and json.loads(data)["error"]["code"] == "busy"
        deadline = time.monotonic() + 10
        while server.engine.has_unfinished() or server.engine.block_manager.num_used_blocks:
            assert time.monotonic() < deadline, "the admitted prompts kept running"
            time.sleep(0.01)
        after = server.metrics.requests
        # none of them generated to its end ("stop"/"length"): the admitted ones were aborted
        assert {k: v for k, v in after.items() if k != "abort"} == {k: v for k, v in before.items() if k != "abort"}
