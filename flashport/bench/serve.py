"""`flashport bench serve`: a load generator for any OpenAI-compatible endpoint (ours or another engine's).

Sends streaming `/v1/completions` (or `/v1/chat/completions`) requests at a fixed concurrency or
at a Poisson request rate, reads the server-sent events as they arrive, and records per request
the send time, the arrival of every chunk with text and the token count (from the final `usage`,
which is requested with `stream_options.include_usage`; else one token per chunk). The metrics
(TTFT, TPOT, ITL, E2EL, goodput under an SLO, request and token throughput, failures) come from
stats.py. Random prompts are token-id lists (`prompt: [ids]`, accepted by the OpenAI completions
API); `ignore_eos` (a vLLM extension our server also takes) makes every request produce OSL tokens.

The client is the standard library's asyncio streams (HTTP/1.1, chunked or plain bodies, TLS for
https), so it needs nothing beyond Python. Every request loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from flashport.bench.stats import SLO, RequestTiming, run_metrics
from flashport.bench.workload import BenchRequest
from flashport.errors import FlashportError


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    prefix: str  # e.g. "/v1"
    api_key: str | None = None

    @classmethod
    def parse(cls, base_url: str, api_key: str | None = None) -> Endpoint:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise FlashportError(f"--base-url {base_url!r}: expected http(s)://host[:port][/v1]")
        port = u.port or (443 if u.scheme == "https" else 80)
        prefix = u.path.rstrip("/") or "/v1"
        return cls(u.scheme, u.hostname, port, prefix, api_key)


class HTTPError(Exception):
    pass


async def _request(ep: Endpoint, method: str, path: str, body: bytes | None, timeout: float):
    """Open a connection, send one request; returns (status, headers, reader, writer)."""
    ctx = ssl.create_default_context() if ep.scheme == "https" else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port, ssl=ctx), timeout)
    hdrs = [f"{method} {path} HTTP/1.1", f"Host: {ep.host}:{ep.port}", "Connection: close",
            "Accept: text/event-stream, application/json", "User-Agent: flashport-bench"]
    if body is not None:
        hdrs += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if ep.api_key:
        hdrs.append(f"Authorization: Bearer {ep.api_key}")
    writer.write(("\r\n".join(hdrs) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout)
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        writer.close()
        raise HTTPError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers, reader, writer


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str], timeout: float):
    """Yield the body's bytes as they arrive (de-chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await asyncio.wait_for(reader.readline(), timeout)
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await asyncio.wait_for(reader.readexactly(size), timeout)
            await reader.readline()  # CRLF after the chunk
            yield data
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await asyncio.wait_for(reader.readexactly(n), timeout)
    else:
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                return
            yield data


async def get_json(ep: Endpoint, path: str, timeout: float = 10.0) -> dict:
    status, headers, reader, writer = await _request(ep, "GET", ep.prefix + path, None, timeout)
    try:
        body = b"".join([c async for c in _body_chunks(reader, headers, timeout)])
    finally:
        writer.close()
    if status != 200:
        raise HTTPError(f"GET {path}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


async def stream_one(ep: Endpoint, req: BenchRequest, model: str, chat: bool, origin: float,
                     timeout: float) -> RequestTiming:
    """One streaming request; timings relative to `origin` (time.perf_counter())."""
    if chat:
        if not isinstance(req.prompt, str):
            raise FlashportError("--endpoint chat needs text prompts (a --dataset), not random token ids")
        payload: dict = {"model": model, "messages": [{"role": "user", "content": req.prompt}]}
        path = ep.prefix + "/chat/completions"
    else:
        payload = {"model": model, "prompt": req.prompt if isinstance(req.prompt, str) else list(req.prompt)}
        path = ep.prefix + "/completions"
    payload.update(max_tokens=req.output_len, temperature=0.0, stream=True, ignore_eos=True,
                   stream_options={"include_usage": True})
    rec = RequestTiming(start=time.perf_counter() - origin, prompt_tokens=req.prompt_len)
    usage_tokens = None
    writer = None
    try:
        status, headers, reader, writer = await _request(ep, "POST", path, json.dumps(payload).encode(), timeout)
        if status != 200:
            body = b"".join([c async for c in _body_chunks(reader, headers, timeout)])
            raise HTTPError(f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}")
        buf = b""
        done = False
        async for data in _body_chunks(reader, headers, timeout):
            now = time.perf_counter() - origin
            buf += data.replace(b"\r\n", b"\n")
            while b"\n\n" in buf and not done:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    text = line[5:].strip()
                    if text == b"[DONE]":
                        done = True
                        break
                    msg = json.loads(text)
                    if "error" in msg:
                        raise HTTPError(f"stream error: {msg['error']}")
                    if msg.get("usage"):
                        usage_tokens = msg["usage"].get("completion_tokens", usage_tokens)
                        if usage_tokens is not None and msg["usage"].get("prompt_tokens"):
                            rec.prompt_tokens = msg["usage"]["prompt_tokens"]
                    for ch in msg.get("choices") or []:
                        if chat:  # a thinking model streams its reasoning first: those are tokens too
                            delta = ch.get("delta") or {}
                            piece = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                        else:
                            piece = ch.get("text")
                        if piece or (ch.get("finish_reason") is None and piece is not None):
                            rec.token_times.append(now)
                            rec.token_counts.append(1)
            if done:
                break
        rec.end = time.perf_counter() - origin
        if not rec.token_times:
            raise HTTPError("the stream ended without any token")
        if usage_tokens is not None:
            rec.output_tokens = usage_tokens
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HTTPError, ValueError) as e:
        rec.ok = False
        rec.error = f"{type(e).__name__}: {e}"[:300]
        rec.end = time.perf_counter() - origin
    finally:
        if writer is not None:
            writer.close()
    return rec


async def run_load(ep: Endpoint, requests: list[BenchRequest], *, model: str, concurrency: int | None,
                   request_rate: float | None, duration: float | None, chat: bool = False, seed: int = 0,
                   timeout: float = 600.0, progress: bool = True) -> tuple[list[RequestTiming], float]:
    """Send `requests` at a fixed concurrency, or Poisson arrivals at `request_rate` per second (with
    at most `concurrency` in flight when both are given); stop sending after `duration` seconds."""
    from tqdm import tqdm

    if not concurrency and not request_rate:
        raise FlashportError("give --concurrency or --request-rate")
    origin = time.perf_counter()
    records: list[RequestTiming] = []
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(requests), desc="serve", disable=not progress, mininterval=2.0)

    async def one(r: BenchRequest) -> None:
        if sem is not None:
            async with sem:
                rec = await stream_one(ep, r, model, chat, origin, timeout)
        else:
            rec = await stream_one(ep, r, model, chat, origin, timeout)
        records.append(rec)
        bar.update(1)

    rng = random.Random(seed)
    tasks = []
    for r in requests:
        if duration is not None and time.perf_counter() - origin > duration:
            break
        if request_rate:
            tasks.append(asyncio.create_task(one(r)))
            await asyncio.sleep(rng.expovariate(request_rate))
        else:
            await sem.acquire()  # fixed concurrency: start the next only when a slot frees
            sem.release()
            tasks.append(asyncio.create_task(one(r)))
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    bar.close()
    return records, time.perf_counter() - origin


def run_serve_bench(base_url: str, requests: list[BenchRequest], *, model: str | None, concurrency: int | None,
                    request_rate: float | None, duration: float | None, chat: bool = False, api_key: str | None = None,
                    slo: SLO = SLO(), num_gpus: int = 1, seed: int = 0, timeout: float = 600.0,
                    progress: bool = True, label: str = "") -> dict:
    ep = Endpoint.parse(base_url, api_key)

    async def main() -> tuple[str, list[RequestTiming], float]:
        name = model
        if name is None:
            try:
                name = (await get_json(ep, "/models"))["data"][0]["id"]
            except (OSError, asyncio.TimeoutError, HTTPError, KeyError, IndexError, ValueError) as e:
                raise FlashportError(f"could not read the model name from {base_url}/models ({e}); "
                                     "pass --served-model") from None
        recs, dur = await run_load(ep, requests, model=name, concurrency=concurrency, request_rate=request_rate,
                                   duration=duration, chat=chat, seed=seed, timeout=timeout, progress=progress)
        return name, recs, dur

    name, records, dur = asyncio.run(main())
    res = run_metrics(records, dur, slo, num_gpus)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "?").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    res.update(label=label or (f"c{concurrency}" if concurrency and not request_rate else f"rate {request_rate}/s"),
               base_url=base_url, model=name, concurrency=concurrency, request_rate=request_rate,
               endpoint="chat" if chat else "completions", errors=errors,
               first_errors=[r.error for r in records if not r.ok][:5],
               per_request=[{"start": r.start, "ttft": r.ttft, "e2el": r.e2el, "output_tokens": r.num_output,
                             "prompt_tokens": r.prompt_tokens, "ok": r.ok} for r in records])
    return res
