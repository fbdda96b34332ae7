"""Request validation for both front doors (websocket and HTTP) and the OpenAI-compatible response shapes.

    messages = validate_messages(body["messages"], cfg)           # ApiError naming the field, or clean messages
    prompt = render_chat(tok, messages)                            # model/chat.py's renderer; ends <|assistant_start|>
    params = sampling_params(body, cfg, prompt_len=len(prompt), max_context=T)
    prompts = completion_prompts(tok, body["prompt"], vocab_size)  # text, token ids, or lists of either
    lps, tops = prompt_logprobs(model, ids, top_n=1)              # echo + logprobs: one forward pass

`cfg` is the server's ServerConfig (infer/server.py): the limits live there and every error message quotes them.
Errors are `ApiError(code, message, param)` with code one of ERROR_CODES — the websocket protocol's codes; the
HTTP side maps them to a status and OpenAI's error envelope {"error": {"message", "type", "param", "code"}}.

What /v1/completions supports: `prompt` as a string, a list of strings, a list of token ids or a list of lists of
token ids (one choice per prompt, `index` in order; `n` must be 1); text prompts are encoded as ordinary text after
<|bos|> (every training document starts with it); token-id prompts are used as given. `echo` prepends the prompt to
the text; `logprobs` (an integer 0..MAX_LOGPROBS) returns OpenAI's legacy logprobs object. Prompt-token logprobs
(echo) come from one dense forward pass over the prompt (`prompt_logprobs`: (T, V) fp32 logits at once, fine up to
the model's context; the first token has none: null), with the top `logprobs` alternatives. Generated tokens carry
the logprob of the sampled token under the raw model distribution (infer/sampling.py) and, as their
top_logprobs, only that token (the engine does not return alternatives). `max_tokens: 0` needs `echo` (nothing
would be returned otherwise) and runs no generation: lm-evaluation-harness's loglikelihood path.
Not supported (400 naming the field): n != 1, best_of, suffix, logit_bias, nonzero presence/frequency penalties,
tools/functions on the chat endpoint. Other unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import torch

from infer.sampling import SamplingParams, SamplingParamsError
from model.chat import ChatFormatError, render_for_completion

ERROR_CODES = ("invalid_request", "busy", "context_length", "internal")
ROLES = ("system", "user", "assistant")
MAX_LOGPROBS = 5
# Fields of SamplingParams a client may set, on every front door (ws "params", chat and completions bodies).
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "max_tokens", "seed")
UNSUPPORTED = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
               "suffix": None, "tools": None, "functions": None, "tool_choice": None}


class ApiError(Exception):
    """A request the server refuses. code: one of ERROR_CODES; param: the offending field (OpenAI's `param`)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        if code not in ERROR_CODES:
            raise ValueError(f"ApiError code must be one of {ERROR_CODES}, got {code!r}")
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError("invalid_request", message, param)


# ---- messages -------------------------------------------------------------------------------------------------
def _content_text(content, where: str) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": str} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"{where}.content must be a string (or a list of text parts), got {type(content).__name__}",
               f"{where}.content")


def validate_messages(messages, cfg) -> list[dict]:
    """Check a conversation against the server's limits; returns [{"role", "content": str}] ending with a user
    message. Errors name the message index and the limit."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > cfg.max_messages:
        raise _bad(f"messages: {len(messages)} messages, at most max_messages={cfg.max_messages} are allowed",
                   "messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content, got {type(m).__name__}", where)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        text = _content_text(m.get("content"), where)
        if not text.strip():
            raise _bad(f"{where}.content is empty", f"{where}.content")
        if len(text) > cfg.max_message_chars:
            raise _bad(f"{where}.content is {len(text)} characters, over max_message_chars={cfg.max_message_chars}",
                       f"{where}.content")
        total += len(text)
        out.append({"role": role, "content": text})
    if total > cfg.max_total_chars:
        raise _bad(f"messages total {total} characters, over max_total_chars={cfg.max_total_chars}", "messages")
    if out[-1]["role"] != "user":
        raise _bad(f"messages[{len(out) - 1}].role must be 'user': the model answers the last user message, got "
                   f"{out[-1]['role']!r}", f"messages[{len(out) - 1}].role")
    return out


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids through model/chat.py (the only renderer); its format errors become invalid_request."""
    try:
        return render_for_completion(tokenizer, messages)
    except ChatFormatError as e:
        raise _bad(f"messages: {e}", "messages") from None


# ---- sampling parameters --------------------------------------------------------------------------------------
def check_context(prompt_len: int, max_tokens: int, max_context: int, param: str = "max_tokens") -> None:
    if prompt_len + max_tokens > max_context:
        raise ApiError("context_length", f"this model's maximum context length is {max_context} tokens, but "
                       f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt, {max_tokens} to "
                       f"generate): shorten the conversation or lower {param}", param)


def _field(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def sampling_params(fields: dict, cfg, *, prompt_len: int, max_context: int, strict: bool = False,
                    where: str = "", stop=None, logprobs: bool = False) -> SamplingParams:
    """SamplingParams from a request's fields (only SAMPLING_FIELDS are read; `strict` rejects any other key —
    the ws "params" object, named by `where`). max_tokens defaults to min(cfg.default_max_tokens, the room left
    in the context); a given max_tokens must lie in [1, cfg.max_tokens] and fit the context with the prompt."""
    if not isinstance(fields, dict):
        raise _bad(f"{where or 'params'} must be an object, got {type(fields).__name__}", where or "params")
    if strict:
        unknown = sorted(set(fields) - set(SAMPLING_FIELDS))
        if unknown:
            raise _bad(f"{where}: unknown fields {unknown}; allowed: {list(SAMPLING_FIELDS)}", where)
    kwargs = {k: fields[k] for k in SAMPLING_FIELDS if fields.get(k) is not None}
    mt_field = _field(where, "max_tokens")
    room = max_context - prompt_len
    if room < 1:  # the prompt alone fills the context: no default max_tokens can help
        check_context(prompt_len, 1, max_context, mt_field)
    mt = kwargs.setdefault("max_tokens", min(cfg.default_max_tokens, room))
    if isinstance(mt, int) and not isinstance(mt, bool) and mt > cfg.max_tokens:
        raise _bad(f"{mt_field} must be at most {cfg.max_tokens} (the server's max_tokens limit), got {mt}",
                   mt_field)
    try:
        params = SamplingParams(**kwargs, stop=stop or (), logprobs=logprobs)
    except SamplingParamsError as e:
        raise _bad(f"{where}.{e}" if where else str(e), _field(where, e.param)) from None
    check_context(prompt_len, params.max_tokens, max_context, mt_field)
    return params


def reject_unsupported(body: dict) -> None:
    for key, neutral in UNSUPPORTED.items():
        if key in body and body[key] is not None and body[key] != neutral:
            raise _bad(f"{key} is not supported by this server (got {body[key]!r})", key)


def stop_strings(body: dict):
    stop = body.get("stop")
    if stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        return stop
    raise _bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")


# ---- completions prompts and logprobs ------------------------------------------------------------------------
def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def completion_prompts(tokenizer, prompt, vocab_size: int) -> list[tuple[list[int], str]]:
    """(token ids, echo text) per prompt of a /v1/completions body (see the module docstring)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise _bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not p:
                raise _bad(f"prompt[{i}] is empty", "prompt")
            out.append(([tokenizer.bos_id] + tokenizer.encode_ordinary(p), p))
        elif _is_ids(p):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise _bad(f"prompt[{i}]: token ids must lie in [0, {vocab_size}), got {bad[:5]}", "prompt")
            out.append((list(p), tokenizer.decode(p)))
        else:
            raise _bad(f"prompt[{i}] must be a non-empty string or a non-empty list of token ids", "prompt")
    return out


@torch.no_grad()
def prompt_logprobs(model, ids: list[int], top_n: int) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """Logprob of every prompt token given the ones before it (None for the first) and the top_n alternatives
    at each position, from one dense causal forward pass over (1, T)."""
    x = torch.tensor([ids], dtype=torch.long, device=model.cos.device)
    logp = torch.log_softmax(model(x, logits_positions="all")[0, :-1].float(), dim=-1)  # (T-1, V): predicts 1..T-1
    target = x[0, 1:]
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()
    tops: list[dict[int, float] | None] = [None]
    if top_n > 0:
        vals, idx = logp.topk(top_n, dim=-1)
        tops += [dict(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops += [{} for _ in chosen]
    return [None] + chosen, tops


def logprobs_object(tokenizer, ids: list[int], lps: list[float | None], tops: list[dict | None]) -> dict:
    """OpenAI's legacy completions logprobs: tokens (as text), token_logprobs, top_logprobs, text_offset."""
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    top = [None if d is None else {tokenizer.decode([t]): v for t, v in d.items()} for d in tops]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


# ---- response shapes -----------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, created: int, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}], "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               use: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [] if use is not None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish_reason}]}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(rid: str, created: int, model: str, choices: list[dict], use: dict | None,
               obj: str = "text_completion") -> dict:
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def error_body(code: str, message: str, param: str | None) -> dict:
    kind = {"invalid_request": "invalid_request_error", "context_length": "invalid_request_error",
            "busy": "server_busy", "internal": "internal_error"}.get(code, code)
    wire_code = "context_length_exceeded" if code == "context_length" else code
    return {"error": {"message": message, "type": kind, "param": param, "code": wire_code}}
