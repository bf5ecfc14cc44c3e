"""Benchmark prompts: seeded random token ids, or a JSONL / ShareGPT file.

- random: `n` prompts of `isl` token ids drawn from [2, vocab) with a seeded generator; with
  `shared_prefix = P` every prompt starts with the same P tokens (so prefix reuse computes them
  once: a way to measure decode at long context without prefilling every prompt; always reported);
- JSONL: one object per line, `{"prompt": "text"}` or `{"prompt_token_ids": [...]}`, optionally
  `"output_len"`;
- ShareGPT: a JSON list of `{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}`; the first human turn is the prompt and, with a tokenizer,
  the first reply's token count is the output length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from flashport.errors import FlashportError


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | tuple[int, ...]
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise FlashportError(f"a benchmark request needs prompt_len and output_len >= 1, got "
                                 f"{self.prompt_len}, {self.output_len}")


def random_requests(n: int, isl: int, osl: int, vocab_size: int, *, seed: int = 0, shared_prefix: int = 0,
                    low: int = 2) -> list[BenchRequest]:
    if n < 1 or isl < 1 or osl < 1:
        raise FlashportError(f"random prompts need n, isl, osl >= 1, got {n}, {isl}, {osl}")
    if not 0 <= shared_prefix < isl:
        raise FlashportError(f"shared_prefix = {shared_prefix}: must be in [0, isl = {isl})")
    if vocab_size <= low:
        raise FlashportError(f"vocab_size {vocab_size} leaves no token ids above {low}")
    rng = random.Random(seed)
    prefix = [rng.randrange(low, vocab_size) for _ in range(shared_prefix)]
    out = []
    for _ in range(n):
        tail = [rng.randrange(low, vocab_size) for _ in range(isl - shared_prefix)]
        out.append(BenchRequest(tuple(prefix + tail), isl, osl))
    return out


def load_requests(path: str | Path, n: int | None, default_osl: int, tokenizer=None,
                  max_len: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL or ShareGPT JSON file (the format is detected from the content)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise FlashportError(f"--dataset {p}: file not found") from None
    stripped = text.lstrip()
    rows: list[dict]
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FlashportError(f"--dataset {p}: not valid JSON ({e})") from None
        rows = [_sharegpt_row(p, i, item) for i, item in enumerate(data)]
        rows = [r for r in rows if r is not None]
    else:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FlashportError(f"--dataset {p}: line {i + 1} is not valid JSON ({e})") from None
    out: list[BenchRequest] = []
    for i, r in enumerate(rows):
        if n is not None and len(out) >= n:
            break
        if not isinstance(r, dict):
            raise FlashportError(f"--dataset {p}: entry {i} is not an object")
        if "prompt_token_ids" in r:
            ids = r["prompt_token_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                raise FlashportError(f"--dataset {p}: entry {i}: prompt_token_ids must be a non-empty list of ints")
            prompt: str | tuple[int, ...] = tuple(ids)
            plen = len(ids)
        elif isinstance(r.get("prompt"), str) and r["prompt"]:
            prompt = r["prompt"]
            plen = len(tokenizer.encode(prompt)) if tokenizer is not None else max(1, len(prompt) // 4)
        else:
            raise FlashportError(f"--dataset {p}: entry {i} has neither a 'prompt' string nor 'prompt_token_ids'")
        osl = r.get("output_len")
        if osl is None and isinstance(r.get("completion"), str) and tokenizer is not None:
            osl = len(tokenizer.encode(r["completion"]))
        osl = int(osl) if osl else default_osl
        if max_len is not None and plen + osl > max_len:
            continue  # too long for the engine: skipped, as other benchmarks do
        out.append(BenchRequest(prompt, plen, max(1, osl)))
    if not out:
        raise FlashportError(f"--dataset {p}: no usable requests")
    return out


def _sharegpt_row(p: Path, i: int, item: object) -> dict | None:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise FlashportError(f"--dataset {p}: entry {i} has no 'conversations' list (ShareGPT format)")
    turns = item["conversations"]
    human = next((t for t in turns if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
    if human is None or not isinstance(human.get("value"), str) or not human["value"]:
        return None
    k = turns.index(human)
    reply = next((t for t in turns[k + 1:] if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")), None)
    row = {"prompt": human["value"]}
    if reply is not None and isinstance(reply.get("value"), str):
        row["completion"] = reply["value"]
    return row
