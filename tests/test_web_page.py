"""The chat web page in a real headless Chromium, against the real server (infer.server) and a tiny real model.

What a user does, through real input events: the page connects; a typed message streams an answer in (the text
grows over several renders, then done); Stop during a long answer sends cancel and the answer ends as stopped;
editing the first message truncates the conversation and regenerates; settings persist across a reload; an error
frame of the server (a context_length refusal) is shown; a dropped socket reconnects; a server's API key is taken
from the page's #key= fragment. Model output is untrusted:
markdown carrying <script>, onerror handlers and javascript: links creates no element and runs nothing. A
390×844 phone viewport has no horizontal overflow. Screenshots go to the test's tmp dir; with
FLASHCHAT_SAVE_SCREENSHOTS=1 one desktop and one phone shot also refresh bench/results/web/ (committed: a run
leaves the working tree clean otherwise).

Skipped, with the reason, when no Chromium binary is installed (CI installs Debian's chromium).
"""

import contextlib
import inspect
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

import bpe_rs
from model.config import ModelConfig
from infer.server import Server, ServerConfig, ServerThread
from tests.browser import Browser, find_chromium
from tests.models import random_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "web"
CONTEXT = 512  # tokens: room for a long answer to stop in the middle of

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no Chromium binary (chromium, google-chrome, or $FLASHCHAT_CHROMIUM)")

# Installed before the page's own script: records every frame the page sends and receives, and keeps the open
# socket reachable so a test can deliver a frame through the page's real message path.
SPY = """
window.__sent = []; window.__recv = []; window.__sockets = [];
const NativeWS = window.WebSocket;
window.WebSocket = function (url, protocols) {
  const ws = new NativeWS(url, protocols);
  window.__sockets.push(ws);
  const send = ws.send.bind(ws);
  ws.send = data => { window.__sent.push(JSON.parse(data)); send(data); };
  ws.addEventListener('message', ev => window.__recv.push(JSON.parse(ev.data)));
  return ws;
};
window.WebSocket.prototype = NativeWS.prototype;
window.WebSocket.OPEN = NativeWS.OPEN;
"""
CONNECTED = "document.querySelector('#conn').dataset.state === 'connected'"
IDLE = "!document.body.classList.contains('generating')"


@pytest.fixture(scope="module")
def model_and_tok():
    tok = bpe_rs.train_from_iterator([inspect.getsource(textwrap)], vocab_size=400)
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=CONTEXT)
    return random_model(cfg, 0.1), tok


@contextlib.contextmanager
def serving(model_and_tok, **config):
    config = ServerConfig(port=0, model_name="tiny-web", block_size=16, num_blocks=128, max_tokens=CONTEXT, **config)
    thread = ServerThread(Server(config, lambda: model_and_tok, log=lambda _: None))
    with thread as srv:
        thread.wait_ready()
        yield f"http://127.0.0.1:{srv.port}/"


@pytest.fixture(scope="module")
def server(model_and_tok):
    with serving(model_and_tok) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with Browser.launch() as b:
        yield b


def open_page(browser, url, width=1280, height=800, mobile=False, settings=None):
    page = browser.new_page(width, height, mobile)
    page.add_init_script(SPY)
    page.navigate(url)
    page.wait_for(CONNECTED, 10, what="the page to connect")
    set_settings(page, settings or {})
    return page


def set_settings(page, settings):
    for name, value in settings.items():  # through the settings form's change events, as a user's edits
        page.evaluate(f"(() => {{ const e = document.getElementById('set-{name}'); e.value = {json.dumps(str(value))};"
                      f" e.dispatchEvent(new Event('change')); }})()")


def send_message(page, text):
    page.click("#input")
    page.type_text(text)
    page.press("Enter")


def frames(page, where, type_):
    return page.evaluate(f"window.{where}.filter(f => f.type === {json.dumps(type_)})")


def inject(page, frame):
    """Deliver a frame for the running request through the page's real socket message path (the server's own
    frames for it keep coming; a random model cannot be made to write HTML or call the tool)."""
    page.evaluate(f"""(() => {{
        const frame = {json.dumps(frame)};
        frame.id = window.__sent.filter(f => f.type === 'generate').pop().id;
        const ws = window.__sockets[window.__sockets.length - 1];
        ws.dispatchEvent(new MessageEvent('message', {{data: JSON.stringify(frame)}}));
    }})()""")


def save_shot(page, tmp_path, name):
    path = page.screenshot(tmp_path / f"{name}.png")
    if os.environ.get("FLASHCHAT_SAVE_SCREENSHOTS") == "1":
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, RESULTS / f"{name}.png")
    return path


def test_chat_streams_edits_and_regenerates(server, browser, tmp_path):
    page = open_page(browser, server, settings={"temperature": 0, "top_k": 0, "max_tokens": 48})
    assert page.evaluate("document.querySelector('#conn').textContent") == "connected"
    # Every render of the answer, as the user sees it: the text must grow over several steps, not arrive at once.
    page.evaluate("""window.__lengths = [];
        new MutationObserver(() => {
          const a = document.querySelector('.msg.assistant .body');
          if (a) window.__lengths.push(a.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    send_message(page, "Tell me about text wrapping")
    page.wait_for("window.__recv.some(f => f.type === 'done')", 30, what="the answer's done frame")
    page.wait_for(IDLE, 5)

    (gen,) = frames(page, "__sent", "generate")
    assert gen["messages"] == [{"role": "user", "content": "Tell me about text wrapping"}]
    assert gen["params"] == {"temperature": 0, "top_k": 0, "max_tokens": 48}
    deltas = [f for f in frames(page, "__recv", "delta") if f["id"] == gen["id"]]
    (done,) = frames(page, "__recv", "done")
    assert done["id"] == gen["id"] and done["finish_reason"] in ("stop", "length")
    streamed = "".join(f["text"] for f in deltas)
    assert len(deltas) >= 3 and streamed.strip()
    growth = sorted(set(n for n in page.evaluate("window.__lengths") if n > 0))
    assert len(growth) >= 3, f"the answer did not stream in: rendered lengths {growth}"
    answer = page.evaluate("document.querySelector('.msg.assistant .body').textContent")
    assert answer.split() == streamed.split()  # markdown may restyle, never drop or invent words
    assert "tokens" in page.evaluate("document.querySelector('.msg.assistant .meta').textContent")

    # A second turn carries the first answer as history.
    send_message(page, "And more?")
    page.wait_for(f"window.__recv.filter(f => f.type === 'done').length === 2 && {IDLE}", 30)
    second = frames(page, "__sent", "generate")[1]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == streamed
    save_shot(page, tmp_path, "desktop")

    # Edit the first message: everything after it goes, and the edited question is answered afresh.
    page.click(".msg.user .actions .edit")
    page.evaluate("document.querySelector('.msg.user textarea').select()")
    page.type_text("Wrap this paragraph instead")
    page.click(".msg.user .actions .save")
    page.wait_for(f"window.__recv.filter(f => f.type === 'done').length === 3 && {IDLE}", 30)
    third = frames(page, "__sent", "generate")[2]
    assert third["messages"] == [{"role": "user", "content": "Wrap this paragraph instead"}]
    roles = page.evaluate("[...document.querySelectorAll('#messages .msg')].map(e => e.classList[1])")
    assert roles == ["user", "assistant"]
    assert page.evaluate("document.querySelector('.msg.user .bubble').textContent") == "Wrap this paragraph instead"
    assert page.evaluate("document.querySelector('.msg.assistant .body').textContent").strip()

    # Regenerate the last answer: the same question goes again, the old answer is replaced.
    page.click(".msg.assistant .actions .regen")
    page.wait_for(f"window.__recv.filter(f => f.type === 'done').length === 4 && {IDLE}", 30)
    assert frames(page, "__sent", "generate")[3]["messages"] == third["messages"]
    assert page.evaluate("document.querySelectorAll('#messages .msg').length") == 2

    # New chat empties the conversation.
    page.click("#new-chat")
    assert page.evaluate("document.querySelectorAll('#messages .msg').length") == 0
    assert page.errors() == []


def test_stop_cancels_a_long_answer(server, browser):
    # Greedy decoding of this random model runs past 400 tokens without <|assistant_end|> (deterministic: the
    # weights are seeded), so the answer is still going when Stop is pressed after its first delta.
    page = open_page(browser, server, settings={"temperature": 0, "top_k": 0, "max_tokens": 400})
    send_message(page, "Write a long story")
    page.wait_for("window.__recv.some(f => f.type === 'delta')", 30, what="the first delta")
    page.click("#stop")
    page.wait_for("window.__recv.some(f => f.type === 'done')", 10, what="done after cancel")
    page.wait_for(IDLE, 5)
    (gen,) = frames(page, "__sent", "generate")
    (cancel,) = frames(page, "__sent", "cancel")
    (done,) = frames(page, "__recv", "done")
    assert cancel["id"] == gen["id"] == done["id"]
    assert done["finish_reason"] == "abort" and done["usage"]["completion_tokens"] < 400
    assert "stopped" in page.evaluate("document.querySelector('.msg.assistant .meta').textContent")
    # The page is usable again, and the stopped (partial) answer is part of the history.
    partial = "".join(f["text"] for f in frames(page, "__recv", "delta"))
    set_settings(page, {"max_tokens": 8})
    send_message(page, "Short one")
    page.wait_for("window.__recv.filter(f => f.type === 'done').length === 2", 30)
    history = frames(page, "__sent", "generate")[1]["messages"]
    assert history[1] == {"role": "assistant", "content": partial}
    # Editing the first message while an answer streams cancels that answer and starts over from the edit.
    set_settings(page, {"max_tokens": 400})
    send_message(page, "Keep going")
    page.wait_for("window.__recv.filter(f => f.type === 'delta').length > " + str(len(frames(page, "__recv", "delta"))))
    page.click(".msg.user .actions .edit")
    page.evaluate("document.querySelector('.msg.user textarea').select()")
    page.type_text("Edited while streaming")
    page.click(".msg.user .actions .save")
    page.wait_for("window.__sent.filter(f => f.type === 'generate').length === 4")
    streaming, restarted = frames(page, "__sent", "generate")[2:]
    assert frames(page, "__sent", "cancel")[-1]["id"] == streaming["id"]
    assert restarted["messages"] == [{"role": "user", "content": "Edited while streaming"}]
    assert page.evaluate("document.querySelectorAll('#messages .msg').length") == 2
    page.click("#stop")
    page.wait_for(IDLE, 10)
    assert page.errors() == []


MARKDOWN_CASES = [
    ("# Title\ntext **bold** and *it* and `a<b>`",
     "<h1>Title</h1><p>text <strong>bold</strong> and <em>it</em> and <code>a&lt;b&gt;</code></p>"),
    ("- one\n- two\n\n1. first\n2) second", "<ul><li>one</li><li>two</li></ul><ol><li>first</li><li>second</li></ol>"),
    ("snake_case_name and window.__x__y stay plain", "<p>snake_case_name and window.__x__y stay plain</p>"),
    ("> quote\n\nline one\nline two", "<blockquote>quote</blockquote><p>line one<br>line two</p>"),
    ("[a](https://x.org/?q=1&r=2) ~~old~~", '<p><a href="https://x.org/?q=1&amp;r=2" target="_blank" '
                                            'rel="noopener noreferrer">a</a> <del>old</del></p>'),
    ("```py\nif a < b:\n    **x**\n```", '<div class="codeblock"><div class="head"><span>py</span><button '
                                          'type="button" class="copy">copy</button></div><pre><code>if a &lt; b:\n'
                                          '    **x**</code></pre></div>'),
    ("```\nstill streaming", '<div class="codeblock"><div class="head"><span>code</span><button type="button" '
                              'class="copy">copy</button></div><pre><code>still streaming</code></pre></div>'),
]


def test_markdown_renderer(server, browser):
    page = open_page(browser, server)
    for src, expected in MARKDOWN_CASES:
        assert page.evaluate(f"flashchat.renderMarkdown({json.dumps(src)})") == expected, src


def test_untrusted_markdown_creates_no_elements_and_runs_nothing(server, browser, tmp_path):
    page = open_page(browser, server, settings={"temperature": 0, "top_k": 0, "max_tokens": 400})
    evil = ("<img src=x onerror=\"window.__pwned = 'img'\"> <script>window.__pwned = 'script'</script>\n"
            "<svg onload=\"window.__pwned = 'svg'\"></svg> <iframe src=\"javascript:window.__pwned='iframe'\">\n"
            "[click](javascript:window.__pwned='link') [ok](https://example.com/a?b=1&c=\"x\"onmouseover=y)\n"
            "**<b>bold</b>** `<i>code</i>`\n```html\n<script>window.__pwned = 'fence'</script>\n```\n")
    # Straight through the renderer: only the renderer's own tags come out, with no handler attributes.
    rendered = page.evaluate(f"""(() => {{
        const d = document.createElement('div');
        d.innerHTML = flashchat.renderMarkdown({json.dumps(evil)});
        const els = [...d.querySelectorAll('*')];
        return {{tags: [...new Set(els.map(e => e.tagName.toLowerCase()))].sort(),
                attrs: [...new Set(els.flatMap(e => [...e.attributes].map(a => a.name)))].sort(),
                hrefs: [...d.querySelectorAll('a')].map(a => a.getAttribute('href'))}};
    }})()""")
    assert set(rendered["tags"]) <= {"p", "br", "strong", "em", "code", "a", "div", "span", "button", "pre"}
    assert rendered["attrs"] == ["class", "href", "rel", "target", "type"]
    # The quote was escaped before the link was made: it stays inside the href value, no attribute breaks out.
    assert rendered["hrefs"] == ['https://example.com/a?b=1&c="x"onmouseover=y']
    # And as a real frame on the page's socket, in the middle of a real answer.
    send_message(page, "Say something")
    page.wait_for("window.__recv.some(f => f.type === 'delta')", 30)
    inject(page, {"type": "delta", "text": evil})
    # A tool call and its result, then more text: a collapsed block between two text parts, shown as text.
    inject(page, {"type": "tool_call", "code": "print('<img src=x onerror=\"window.__pwned=1\">')"})
    inject(page, {"type": "tool_result", "output": "<script>window.__pwned = 'tool'</script>\n"})
    inject(page, {"type": "delta", "text": "after the tool"})
    page.click("#stop")
    page.wait_for(IDLE, 10)
    page.evaluate("new Promise(r => setTimeout(r, 300))")  # give a broken image time to fire onerror
    assert page.evaluate("window.__pwned") is None
    body = "document.querySelector('.msg.assistant .body')"
    assert page.evaluate(f"{body}.querySelectorAll('img, script, svg, iframe, b, i').length") == 0
    hrefs = page.evaluate(f"[...{body}.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    assert all(h.startswith("https://") for h in hrefs) and len(hrefs) == 1
    assert page.evaluate(f"[...{body}.querySelectorAll('a')].every(a => a.attributes.length === 3)")
    text = page.evaluate(f"{body}.textContent")
    assert "<img src=x onerror=" in text and "<script>window.__pwned = 'fence'</script>" in text
    assert page.evaluate(f"{body}.querySelector('.codeblock code').textContent") == \
        "<script>window.__pwned = 'fence'</script>"
    tool = page.evaluate(f"""(() => {{ const t = {body}.querySelector('details.tool');
        return {{open: t.open, summary: t.querySelector('summary').textContent,
                code: t.querySelector('.tool-code').textContent, output: t.querySelector('.tool-output').textContent,
                next: t.nextElementSibling && t.nextElementSibling.textContent}}; }})()""")
    assert tool["open"] is False and tool["summary"] == "python · done"
    assert tool["code"] == "print('<img src=x onerror=\"window.__pwned=1\">')"
    assert tool["output"] == "<script>window.__pwned = 'tool'</script>\n"
    assert "after the tool" in tool["next"]  # a new text part (real deltas of the answer may join it)
    page.click(".msg.assistant details.tool summary")  # collapsible: a click opens it
    assert page.evaluate(f"{body}.querySelector('details.tool').open") is True
    page.screenshot(tmp_path / "untrusted.png")  # for a person to look at; not copied to bench/results


def test_settings_persist_errors_show_and_socket_reconnects(server, browser):
    # The server's max_tokens limit is the context minus one (ready frame): allowed, but no room for a prompt.
    page = open_page(browser, server, settings={"temperature": 0.3, "top_k": 7, "max_tokens": CONTEXT - 1})
    page.navigate(server)  # reload: the settings come back from localStorage
    page.wait_for(CONNECTED, 10)
    values = page.evaluate("['temperature', 'top_k', 'max_tokens'].map(k => document.getElementById('set-' + k).value)")
    assert values == ["0.3", "7", str(CONTEXT - 1)]
    # prompt + max_tokens over the context: the server's error frame is shown, the question is kept.
    send_message(page, "hello")
    page.wait_for("document.querySelector('#messages .error') !== null", 30, what="the error to be shown")
    (err,) = frames(page, "__recv", "error")
    assert err["code"] == "context_length"
    shown = page.evaluate("document.querySelector('#messages .error').textContent")
    assert "context_length" in shown and err["message"] in shown
    assert page.evaluate("document.getElementById('input').value") == "hello"
    # The socket drops: the page says so, backs off, reconnects by itself.
    page.evaluate("window.__sockets[window.__sockets.length - 1].close()")
    page.wait_for("document.querySelector('#conn').dataset.state === 'disconnected'", 5)
    page.wait_for(CONNECTED, 10, what="the page to reconnect")
    assert page.evaluate("window.__sockets.length") == 2
    assert page.errors() == []


def test_phone_layout_has_no_horizontal_overflow(server, browser, tmp_path):
    page = open_page(browser, server, width=390, height=844, mobile=True,
                     settings={"temperature": 0, "top_k": 0, "max_tokens": 300})
    send_message(page, "A long unbroken word: " + "x" * 120)
    page.wait_for("window.__recv.some(f => f.type === 'delta')", 30)
    # A long code line and a long link must scroll inside their block or wrap, not widen the page.
    long_text = "\n```\n" + "y = 1; " * 60 + "\n```\nsee https://example.com/" + "z" * 200 + "\n"
    inject(page, {"type": "delta", "text": long_text})
    page.click("#stop")
    page.wait_for(IDLE, 10)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, innerWidth]")
    assert widths[0] <= widths[2] and widths[1] <= widths[2], f"horizontal overflow: {widths}"
    sticking_out = page.evaluate("""[...document.querySelectorAll('body *')]
        .filter(e => !e.closest('pre') && e.getBoundingClientRect().right > innerWidth + 1)
        .map(e => e.tagName + '.' + e.className)""")
    assert sticking_out == []
    save_shot(page, tmp_path, "phone")
    page.click("#settings-toggle")  # the settings row wraps on a phone rather than widening the page
    assert page.evaluate("document.querySelector('#settings').getBoundingClientRect().height") > 0
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    page.screenshot(tmp_path / "phone-settings.png")
    assert page.errors() == []


def test_api_key_comes_from_the_page_fragment(model_and_tok, browser):
    with serving(model_and_tok, api_key="s3cret") as url:
        page = open_page(browser, url + "#key=s3cret")  # connects: the key goes to /ws?key=
        assert page.evaluate("window.__sockets[0].url").endswith("/ws?key=s3cret")
        keyless = browser.new_page()
        keyless.navigate(url)
        keyless.wait_for("document.querySelector('#conn').dataset.state === 'disconnected'", 10,
                         what="a refused socket to show as disconnected")
        assert "retry in" in keyless.evaluate("document.querySelector('#conn').textContent")
