"""`flashport serve`: the OpenAI-compatible server, tested as clients see it.

Two real server processes on loopback serve the tiny model (started together, once per module):
`server` (API key, 64 KiB body limit) for the API, bad input and the concurrency test, and
`small` (max_num_seqs 2, max_waiting 3, 3 s grace) for the overload and SIGTERM tests (the
SIGTERM test stops it, so it comes last). The official `openai` client is used wherever a
request is one it can send; malformed requests go through http.client or a raw socket.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from server_util import ServerProcess

from flashport.chat import encode_messages, split_reasoning
from flashport.tokenizer import Tokenizer

API_KEY = "sk-flashport-test"
MODEL = "tiny"
MAX_BODY = 65536
GRACE = 3.0


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def _servers(tiny_model_dir):
    """Spawn both servers at module start (their start-up overlaps the in-process tests)."""
    procs = {
        "main": ServerProcess(tiny_model_dir, "--served-model-name", MODEL, "--max-request-bytes", str(MAX_BODY),
                              api_key=API_KEY),
        "small": ServerProcess(tiny_model_dir, "--served-model-name", MODEL, "--max-num-seqs", "2",
                               "--max-waiting", "3", "--shutdown-grace", str(GRACE)),
    }
    yield procs
    for p in procs.values():
        p.close()


@pytest.fixture(scope="module")
def server(_servers):
    _servers["main"].wait_ready()
    return _servers["main"]


@pytest.fixture(scope="module")
def small(_servers):
    _servers["small"].wait_ready()
    return _servers["small"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


def _error(body: bytes) -> dict:
    data = json.loads(body)
    assert set(data) == {"error"}, data
    err = data["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]
    return err


# ---------------------------------------------------------------------------------- in-process

def test_reasoning_stream_split():
    """Streaming the thinking split: `</think>` never leaks, even when spelled by ordinary tokens."""
    from flashport.server.app import ReasoningDeltas

    def run(pieces, thinking=True):
        rd, text, r, c = ReasoningDeltas(thinking), "", "", ""
        for k, p in enumerate(pieces):
            text += p
            dr, dc = rd.update(text, final=k == len(pieces) - 1)
            r, c = r + dr, c + dc
        return r, c

    assert run(["Let me", " think", "</think>", "The answer", " is 4."]) == ("Let me think", "The answer is 4.")
    assert run(["abc </", "thi", "nk>ok"]) == ("abc ", "ok")  # the marker arrives in pieces
    assert run(["abc </", "thx"]) == ("abc </thx", "")  # a near miss is flushed once it cannot match
    assert run(["no close", " at all <"]) == ("no close at all <", "")  # final: everything is reasoning
    assert run(["plain", " text"], thinking=False) == ("", "plain text")


class _FakeEngine:
    """Just enough of `Engine` for the bridge: one 'x' token per step. A prompt containing token 7
    is refused by add_request (RequestError); token 9 makes step() raise."""

    def __init__(self) -> None:
        from types import SimpleNamespace as NS

        self.tokenizer = None
        self.sched_config = NS(max_model_len=64)
        self.config = NS(vocab_size=100)
        self.cache_config = NS(num_comp_blocks=10, num_window_blocks=10, num_state_slots=4)
        self.scheduler = NS(num_running=0, num_waiting=0, num_preemptions=0,
                            cache=NS(prefix_hit_rate=0.0, num_free_comp_blocks=10, num_free_window_blocks=10,
                                     num_free_state_slots=4))
        self.num_steps = 0
        self.reqs: dict[str, list] = {}

    def has_unfinished(self):
        return bool(self.reqs)

    def add_request(self, rid, ids, params):
        from flashport.errors import RequestError

        if 7 in ids:
            raise RequestError("the engine refuses prompt token 7")
        self.reqs[rid] = [ids, params, 0]

    def abort(self, rid):
        self.reqs.pop(rid, None)

    def step(self):
        from flashport.sampling_params import CompletionOutput, RequestOutput

        time.sleep(0.01)
        self.num_steps += 1
        if any(9 in r[0] for r in self.reqs.values()):
            raise RuntimeError("kaboom")
        outs = []
        for rid, r in list(self.reqs.items()):
            r[2] += 1
            done = r[2] >= r[1].max_tokens
            outs.append(RequestOutput(rid, None, r[0], None, [CompletionOutput(
                0, "x" * r[2], [5] * r[2], "length" if done else None)], finished=done))
            if done:
                del self.reqs[rid]
        return outs


def test_bridge_engine_errors_in_process():
    """Engine RequestError -> 400 with its message; an exception in step() fails the requests in
    flight with an error (no traceback to the client) and the server keeps serving."""
    import uvicorn

    from flashport.server.app import ServerSettings, build_app
    from flashport.server.bridge import AsyncEngine
    from flashport.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    bridge = AsyncEngine(_FakeEngine(), max_waiting=8, observer=metrics, log=lambda s: None)
    metrics.bridge = bridge
    app = build_app(bridge, metrics, ServerSettings(served_model_name="fake"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if srv.started:
                break
            time.sleep(0.01)
        port = srv.servers[0].sockets[0].getsockname()[1]
        fake = ServerProcess.__new__(ServerProcess)  # reuse its HTTP helpers only
        fake.api_key, fake._port = None, port

        status, _, body = fake.request("POST", "/v1/completions", {"prompt": [1, 7, 2], "max_tokens": 3})
        assert status == 400 and "refuses prompt token 7" in _error(body)["message"]
        status, _, body = fake.request("POST", "/v1/completions", {"prompt": "text", "max_tokens": 3})
        assert status == 400 and _error(body)["param"] == "prompt"  # no tokenizer: also an engine RequestError
        status, _, body = fake.request("POST", "/v1/completions", {"prompt": [9], "max_tokens": 3})
        assert status == 500 and _error(body)["code"] == "engine_error"
        status, _, body = fake.request("POST", "/v1/completions", {"prompt": [9], "max_tokens": 3, "stream": True})
        assert status == 200
        events = [e for e in body.decode().split("\n\n") if e]
        assert _error(events[-2][len("data: "):].encode())["code"] == "engine_error"
        assert events[-1] == "data: [DONE]"
        status, _, body = fake.request("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 4})
        assert status == 200 and json.loads(body)["choices"][0]["text"] == "xxxx"
        assert fake.request("GET", "/health")[0] == 200
    finally:
        srv.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------------- the API

def test_health_version_models_metrics(server, client):
    status, _, body = server.request("GET", "/health", auth=False)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = server.request("GET", "/version", auth=False)
    assert status == 200 and json.loads(body)["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    m = server.metrics()
    for name in ("flashport_requests_running", "flashport_requests_waiting", "flashport_prefix_cache_hit_rate",
                 "flashport_prompt_tokens_total", "flashport_generation_tokens_total",
                 "flashport_time_to_first_token_seconds_count", "flashport_time_per_output_token_seconds_count",
                 "flashport_e2e_request_latency_seconds_count", "flashport_preemptions_total",
                 "process_resident_memory_bytes"):
        assert any(k[0] == name for k in m), name
    for kind in ("compressed", "window", "state_slot"):
        assert ("flashport_cache_usage_ratio", (("kind", kind),)) in m
    assert ("flashport_requests_finished_total", (("reason", "aborted"),)) in m


def test_completions(client, tok):
    prompt = "The sea is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason == "length" and isinstance(c.text, str)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    # Token ids give the same greedy text; several prompts with n = 2 give prompt-major choices.
    r2 = client.completions.create(model=MODEL, prompt=tok.encode(prompt), max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == c.text
    r3 = client.completions.create(model=MODEL, prompt=[prompt, "Hello"], n=2, max_tokens=5, temperature=1.0,
                                   seed=3, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r3.choices) == [0, 1, 2, 3]
    assert r3.usage.prompt_tokens == len(tok.encode(prompt)) + len(tok.encode("Hello"))
    assert r3.usage.completion_tokens == 4 * 5
    texts = {ch.index: ch.text for ch in r3.choices}
    assert texts[0] != texts[1]  # two samples of one prompt
    # The same batch streamed: the deltas of each choice add up to its text, one finish each.
    chunks = list(client.completions.create(model=MODEL, prompt=[prompt, "Hello"], n=2, max_tokens=5,
                                            temperature=1.0, seed=3, stream=True, extra_body={"ignore_eos": True}))
    for k in range(4):
        mine = [c for ch in chunks for c in ch.choices if c.index == k]
        assert "".join(c.text for c in mine) == texts[k]
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, top_p=0.95,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    c = client.completions.create(seed=99, **kw).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(seed=1234, stream=True, **kw)
                       if ch.choices)
    assert a == b == streamed
    assert a != c


def test_completions_streaming_and_usage(client, tok):
    kw = dict(model=MODEL, prompt="Tell me about the sea.", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(tok.encode(kw["prompt"]))
    assert chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])


def test_logprobs_and_echo(client, tok):
    ids = tok.encode("The sea is blue and the sky")
    g = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = g.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and 1 <= len(top) <= 3 and t in top
        assert v == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the argmax
    # Echo with max_tokens = 0: prompt logprobs only (loglikelihood evaluation).
    e = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ec = e.choices[0]
    assert ec.text == tok.decode(ids) and e.usage.completion_tokens == 0
    assert len(ec.logprobs.tokens) == len(ids) and ec.logprobs.token_logprobs[0] is None
    assert ec.logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in ec.logprobs.token_logprobs[1:])
    # The prompt logprob at the last position equals a one-token generation's after the rest.
    g1 = client.completions.create(model=MODEL, prompt=ids[:-1], max_tokens=1, temperature=0, logprobs=1)
    assert max(ec.logprobs.top_logprobs[-1].values()) == pytest.approx(g1.choices[0].logprobs.token_logprobs[0],
                                                                        abs=1e-4)
    # Echo plus generation: the prompt text comes first, logprobs cover both.
    eg = client.completions.create(model=MODEL, prompt="The sea", max_tokens=3, echo=True, logprobs=0,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert eg.choices[0].text.startswith("The sea")
    assert len(eg.choices[0].logprobs.tokens) == len(tok.encode("The sea")) + 3
    streamed = list(client.completions.create(model=MODEL, prompt="The sea", max_tokens=3, echo=True, logprobs=0,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in streamed) == eg.choices[0].text
    assert sum(len(ch.choices[0].logprobs.tokens) for ch in streamed) == len(eg.choices[0].logprobs.tokens)


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="Write a long story about ships", temperature=0, max_tokens=24,
              extra_body={"ignore_eos": True})
    base = client.completions.create(**kw).choices[0].text
    stop = next(base[k:k + 2] for k in range(3, len(base) - 2)
                if base[k:k + 2].strip() and "\ufffd" not in base[k:k + 2])
    want = base[:base.find(stop)]
    r = client.completions.create(stop=[stop, "never-appears-xyz"], **kw).choices[0]
    assert r.text == want and stop not in r.text and r.finish_reason == "stop"
    deltas = [ch.choices[0].text for ch in client.completions.create(stop=stop, stream=True, **kw) if ch.choices]
    assert "".join(deltas) == want and not any(stop in d for d in deltas)


def test_chat_and_thinking(client, tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sea."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    prompt_ids = tok.encode(encode_messages(msgs))
    assert r.usage.prompt_tokens == len(prompt_ids)
    raw = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=8, temperature=0)
    assert msg.content == raw.choices[0].text
    assert r.usage.completion_tokens == raw.usage.completion_tokens

    # Thinking mode: the reasoning (up to </think>) and the answer are split.
    think_ids = tok.encode(encode_messages(msgs, thinking=True))
    raw_t = client.completions.create(model=MODEL, prompt=think_ids, max_tokens=10, temperature=0).choices[0].text
    want = split_reasoning(raw_t, thinking=True)
    rt = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10, temperature=0,
                                        extra_body={"chat_template_kwargs": {"thinking": True}})
    got = rt.choices[0].message
    assert (got.reasoning_content, got.content) == want
    assert rt.usage.prompt_tokens == len(think_ids)
    # reasoning_effort alone selects thinking mode too ("high" leaves the prompt as it is).
    re_ = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                         reasoning_effort="high")
    assert (re_.choices[0].message.reasoning_content, re_.choices[0].message.content) == want
    # ... also when streaming.
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"chat_template_kwargs": {"thinking": True}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert (reasoning, content) == want
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
    assert finishes == [rt.choices[0].finish_reason]


def test_chat_streaming_n_and_logprobs(client):
    msgs = [{"role": "user", "content": "Hi there!"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 logprobs=True, top_logprobs=2))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert sum(len(ch.choices[0].logprobs.content) for ch in chunks if ch.choices and ch.choices[0].logprobs) \
        == len(content)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # n = 2 streamed: two choices, each with its role chunk and one finish.
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, n=2, seed=5,
                                                 temperature=1.0, stream=True))
    for k in (0, 1):
        mine = [c for ch in chunks for c in ch.choices if c.index == k]
        assert mine[0].delta.role == "assistant"
        assert sum(1 for c in mine if c.finish_reason) == 1


# ---------------------------------------------------------------------------------- bad input

_CHAT = "/v1/chat/completions"
_CMPL = "/v1/completions"
_HI = [{"role": "user", "content": "hi"}]

BAD_INPUT = [
    # (id, path, body, status, param)
    ("malformed-json", _CMPL, b'{"prompt": "hi", ', 400, None),
    ("invalid-utf8", _CMPL, b'{"prompt": "\xff\xfe hi"}', 400, None),
    ("not-an-object", _CMPL, b"[1, 2]", 400, None),
    ("empty-body", _CMPL, b"", 400, None),
    ("nan", _CMPL, b'{"prompt": "hi", "temperature": NaN}', 400, None),
    ("lone-surrogate", _CMPL, b'{"prompt": "\\ud800 hi"}', 400, "prompt"),
    ("type-max-tokens", _CMPL, {"prompt": "hi", "max_tokens": "16"}, 422, "max_tokens"),
    ("type-temperature", _CMPL, {"prompt": "hi", "temperature": True}, 422, "temperature"),
    ("type-prompt", _CMPL, {"prompt": 5}, 422, "prompt"),
    ("missing-prompt", _CMPL, {"max_tokens": 5}, 422, "prompt"),
    ("type-messages", _CHAT, {"messages": "hi"}, 422, "messages"),
    ("type-stream-options", _CMPL, {"prompt": "hi", "stream_options": {"include_usage": "yes"}}, 422,
     "stream_options.include_usage"),
    ("unknown-model", _CMPL, {"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    ("path-as-model", _CHAT, {"model": "../../../../etc/passwd", "messages": _HI}, 404, "model"),
    ("negative-max-tokens", _CMPL, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("huge-max-tokens", _CMPL, {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("prompt-too-long", _CMPL, {"prompt": [5] * 5000, "max_tokens": 1}, 400, "prompt"),
    ("token-outside-vocab", _CMPL, {"prompt": [1, 10**6]}, 400, "prompt"),
    ("n-zero", _CMPL, {"prompt": "hi", "n": 0}, 400, "n"),
    ("n-too-large", _CHAT, {"messages": _HI, "n": 1000}, 400, "n"),
    ("negative-temperature", _CMPL, {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("too-many-logprobs", _CMPL, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("empty-stop", _CMPL, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("stream-bad-n", _CMPL, {"prompt": "hi", "n": 0, "stream": True}, 400, "n"),
    ("empty-messages", _CHAT, {"messages": []}, 400, "messages"),
    ("unknown-role", _CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("negative-max-completion-tokens", _CHAT, {"messages": _HI, "max_completion_tokens": -5}, 400,
     "max_completion_tokens"),
    ("top-logprobs-without-logprobs", _CHAT, {"messages": _HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("bad-reasoning-effort", _CHAT, {"messages": _HI, "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ("tools", _CHAT, {"messages": _HI, "tools": [{"type": "function"}]}, 400, "tools"),
    ("body-too-large", _CMPL, {"prompt": "x" * (MAX_BODY + 100)}, 413, None),
]


@pytest.mark.parametrize("path, body, status, param", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input(server, path, body, status, param):
    got, headers, data = server.request("POST", path, body)
    assert got == status, data
    assert headers["content-type"].startswith("application/json")
    err = _error(data)
    assert err["param"] == param, err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_auth_size_limits_and_still_healthy(server, client):
    body = {"prompt": "hi", "max_tokens": 2}
    status, headers, data = server.request("POST", _CMPL, body, auth=False)
    assert status == 401 and _error(data)["type"] == "authentication_error"
    assert headers.get("www-authenticate") == "Bearer"
    status, _, data = server.request("POST", _CMPL, body, headers={"Authorization": "Bearer wrong-key"})
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    # /health and /metrics stay open; unknown routes are 404 error objects.
    assert server.request("GET", "/health", auth=False)[0] == 200
    status, _, data = server.request("GET", "/v1/nothing-here")
    assert status == 404 and _error(data)
    # A declared body far over the limit is refused before it is sent.
    reply = server.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                       + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # After all the bad input above, the server still serves.
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason
    m = server.metrics()
    assert m[("flashport_engine_up", ())] == 1


# ---------------------------------------------------------------------------------- load

def test_non_streaming_disconnect_aborts(server):
    """A client that goes away mid-request has its request aborted and its state freed at once."""
    before = server.metric("flashport_requests_finished_total", reason="aborted")
    body = json.dumps({"prompt": "Go on and on", "max_tokens": 3000, "ignore_eos": True}).encode()
    import socket

    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while server.metric("flashport_requests_in_flight") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    _settled(server, timeout=5)  # 3000 tokens would take minutes
    assert server.metric("flashport_requests_finished_total", reason="aborted") == before + 1


def _settled(server, timeout=15.0) -> dict:
    """Wait until nothing is in flight and every pool block is free; return the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        busy = (m[("flashport_requests_in_flight", ())], m[("flashport_requests_running", ())],
                m[("flashport_requests_waiting", ())], m[("flashport_requests_queued", ())])
        pools_free = all(m[("flashport_cache_free_blocks", (("kind", k),))]
                         == m[("flashport_cache_total_blocks", (("kind", k),))]
                         for k in ("compressed", "window", "state_slot"))
        if busy == (0, 0, 0, 0) and pools_free:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled: in flight/running/waiting/queued {busy}, pools free {pools_free}")
        time.sleep(0.1)


def test_concurrent_streams_with_disconnects(server):
    """200 streaming requests (completions and chat), 32 at a time; about a third of the clients
    disconnect (before the first token or after a few chunks) and a few requests are invalid.
    Every other request completes without error, and afterwards every block is free and memory is flat."""
    num, concurrency = 200, 32

    async def main(seed0: int, count: int) -> dict:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
        sem = asyncio.Semaphore(concurrency)
        outcomes: dict[str, int] = {}

        async def one(i: int) -> None:
            rng = random.Random(seed0 + i)
            mode = rng.choice(["complete"] * 6 + ["cut-early", "cut-late", "cut-late"] + ["invalid"])
            max_tokens = rng.randint(3, 8)
            chat = rng.random() < 0.5
            async with sem:
                if mode == "invalid":
                    with pytest.raises(openai.BadRequestError):
                        await client.completions.create(model=MODEL, prompt=[1, 10**6], max_tokens=2, stream=True)
                    outcomes[mode] = outcomes.get(mode, 0) + 1
                    return
                if chat:
                    stream = await client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"Question {i}: why?"}],
                        max_tokens=max_tokens, temperature=0.8, seed=i, stream=True,
                        extra_body={"ignore_eos": True})
                else:
                    stream = await client.completions.create(
                        model=MODEL, prompt=f"Request {i} says", max_tokens=max_tokens, temperature=0.8, seed=i,
                        stream=True, extra_body={"ignore_eos": True})
                if mode == "cut-early":
                    await stream.close()  # gone before (or right at) the first token
                    outcomes[mode] = outcomes.get(mode, 0) + 1
                    return
                cut = rng.randint(1, 3) if mode == "cut-late" else None
                finishes, n = [], 0
                async for chunk in stream:
                    n += 1
                    finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
                    if cut is not None and n >= cut:
                        await stream.close()
                        outcomes[mode] = outcomes.get(mode, 0) + 1
                        return
                assert finishes == ["length"], (i, finishes)
                outcomes["complete"] = outcomes.get("complete", 0) + 1

        await asyncio.gather(*(one(i) for i in range(count)))
        await client.close()
        return outcomes

    asyncio.run(main(10_000, concurrency))  # warm-up: the batch sizes this test reaches
    before = _settled(server)
    t0 = time.monotonic()
    outcomes = asyncio.run(main(0, num))
    elapsed = time.monotonic() - t0
    after = _settled(server)
    assert sum(outcomes.values()) == num and outcomes["complete"] > num // 3, outcomes
    aborted = after[("flashport_requests_finished_total", (("reason", "aborted"),))] \
        - before[("flashport_requests_finished_total", (("reason", "aborted"),))]
    assert aborted >= 1, outcomes  # some disconnects did abort running requests
    assert after[("flashport_requests_finished_total", (("reason", "engine_error"),))] == 0
    rss0 = before[("process_resident_memory_bytes", ())]
    rss1 = after[("process_resident_memory_bytes", ())]
    assert rss1 - rss0 < 32 * 2**20, (rss0, rss1)  # flat: no per-request state left behind
    assert elapsed < 60, elapsed
    assert "Traceback" not in server.output(), server.output()
    print(f"200 streams in {elapsed:.1f} s: {outcomes}; {aborted:g} aborted in the engine; "
          f"RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB")


def test_overload_answers_503_and_admitted_requests_complete(small):
    """max_num_seqs 2, max_waiting 3: a burst of 12 gets some 503s (Retry-After), the rest complete."""
    def one(i):
        return small.request("POST", _CMPL, {"prompt": f"Burst {i}", "max_tokens": 6, "ignore_eos": True,
                                             "temperature": 0})

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    ok = [json.loads(b) for s, _, b in results if s == 200]
    busy = [(h, _error(b)) for s, h, b in results if s == 503]
    assert len(ok) + len(busy) == 12 and ok and busy
    assert len(ok) >= 3
    for h, err in busy:
        assert h.get("retry-after") == "1" and err["code"] == "queue_full"
        assert err["type"] == "service_unavailable_error"
    for r in ok:
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 6
    m = _settled(small)
    assert m[("flashport_requests_rejected_total", (("reason", "queue_full"),))] == len(busy)


def test_sigterm_during_load_exits_cleanly(small):
    """SIGTERM with requests in flight: a short one finishes, a long one ends with an error after
    the grace period, new connections are refused, and the process exits 0."""
    results: dict[str, tuple] = {}
    started = {k: threading.Event() for k in ("short", "long")}

    def run(name: str, max_tokens: int) -> None:
        c = openai.OpenAI(base_url=small.base_url, api_key="unused", max_retries=0, timeout=60)
        finish = None
        try:
            for chunk in c.completions.create(model=MODEL, prompt=f"A {name} story", max_tokens=max_tokens,
                                              stream=True, extra_body={"ignore_eos": True}):
                started[name].set()
                finish = chunk.choices[0].finish_reason or finish
            results[name] = ("finished", finish)
        except openai.APIError as exc:
            results[name] = ("error", type(exc).__name__, str(exc))
        finally:
            started[name].set()

    threads = [threading.Thread(target=run, args=("long", 3000)), threading.Thread(target=run, args=("short", 4))]
    for t in threads:
        t.start()
    assert all(e.wait(30) for e in started.values())
    t0 = time.monotonic()
    small.proc.send_signal(15)
    time.sleep(0.5)
    try:  # no longer admitting: the listener is closed (or, on a kept-alive connection, a 503)
        assert small.request("POST", _CMPL, {"prompt": "late", "max_tokens": 2}, timeout=5)[0] == 503
    except OSError:
        pass
    for t in threads:
        t.join(GRACE + 20)
    rc = small.proc.wait(GRACE + 20)
    elapsed = time.monotonic() - t0
    assert rc == 0, small.output()
    assert results["short"] == ("finished", "length"), results
    assert results["long"][0] == "error", results
    assert elapsed < GRACE + 15, elapsed
    with pytest.raises(OSError):
        small.request("GET", "/health", timeout=2)
    assert "SIGTERM" in small.output() and "Traceback" not in small.output()
