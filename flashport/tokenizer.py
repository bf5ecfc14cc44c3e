"""Tokenizer (a `tokenizer.json` loaded with the `tokenizers` library) and streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from flashport.chat import BOS, EOS, MARKUP_TOKENS
from flashport.errors import CheckpointError, RequestError

_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, bos_token_id: int, eos_token_id: int) -> None:
        self._hf = hf
        self._bos = bos_token_id
        self._eos = eos_token_id
        # Ids dropped by skip_special_tokens. Chosen here rather than by the `special` flag alone:
        # checkpoints disagree on whether <think>/</think> are flagged special, and the reasoning
        # parser needs them in the text either way.
        self._skip_ids = frozenset(
            i for i, tok in hf.get_added_tokens_decoder().items() if tok.special and tok.content not in MARKUP_TOKENS
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json`; BOS/EOS come from tokenizer_config.json, then config.json, then V4 defaults."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer.json not found")
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot load tokenizer: {e}") from e
        tok_cfg = _read_json_if_present(model_dir / "tokenizer_config.json")
        model_cfg = _read_json_if_present(model_dir / "config.json")
        bos = _resolve_special_id(hf, "bos", tok_cfg.get("bos_token"), model_cfg.get("bos_token_id"), BOS, model_dir)
        eos = _resolve_special_id(hf, "eos", tok_cfg.get("eos_token"), model_cfg.get("eos_token_id"), EOS, model_dir)
        return cls(hf, bos, eos)

    @property
    def bos_token_id(self) -> int:
        return self._bos

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their ids.

        Nothing is added implicitly (the chat encoder already writes BOS); add_bos prepends BOS
        unless the text already starts with it.
        """
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos and (not ids or ids[0] != self._bos):
            ids.insert(0, self._bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. skip_special_tokens drops control tokens (BOS/EOS/role markers/pad) but
        keeps output markup such as <think>/</think>. Ids outside the vocabulary are ignored."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip_ids]
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)


def _read_json_if_present(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _resolve_special_id(
    hf: _HFTokenizer, what: str, cfg_token: Any, cfg_id: Any, default: str, model_dir: Path
) -> int:
    # tokenizer_config.json writes the token either as a string or as an AddedToken dict.
    if isinstance(cfg_token, dict):
        cfg_token = cfg_token.get("content")
    if isinstance(cfg_token, str):
        token_id = hf.token_to_id(cfg_token)
        if token_id is None:
            raise CheckpointError(
                f"{model_dir / 'tokenizer_config.json'}: {what}_token {cfg_token!r} is not in tokenizer.json"
            )
        return token_id
    if isinstance(cfg_id, list) and cfg_id:  # some configs list several EOS ids; the first is primary
        cfg_id = cfg_id[0]
    if isinstance(cfg_id, int) and not isinstance(cfg_id, bool):
        if not 0 <= cfg_id < hf.get_vocab_size(with_added_tokens=True):
            raise CheckpointError(f"{model_dir / 'config.json'}: {what}_token_id {cfg_id} is outside the vocabulary")
        return cfg_id
    token_id = hf.token_to_id(default)
    if token_id is None:
        raise CheckpointError(
            f"{model_dir}: no {what} token: tokenizer_config.json has no {what}_token, config.json no "
            f"{what}_token_id, and {default!r} is not in tokenizer.json"
        )
    return token_id


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas, with stop strings.

    Only a small window of tokens is decoded per step: a few already-emitted context tokens
    (`_ids[:_read]`) followed by the tokens whose text is not emitted yet. The new text is
    decode(window) minus decode(context), so each step costs O(window), not O(sequence). Text
    ending in U+FFFD is held back, because the next token may complete a multi-byte character.
    """

    # Prompt tokens kept as decoding context, so decoders whose output depends on the previous
    # token (e.g. SentencePiece's leading-space rule) render the first generated token correctly.
    _PROMPT_CONTEXT = 4

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        stop: Iterable[str] | None = None,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = list(stop or [])
        for s in self._stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings, got {s!r}")
        self._ids: list[int] = list(prompt_ids[-self._PROMPT_CONTEXT:]) if prompt_ids else []
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        self._pending = ""  # decoded text not emitted yet because it may start a stop string
        self._finished = False
        self.stopped = False
        self.stop_str: str | None = None  # the stop string that ended the output, if any

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed generated ids; returns the newly completed text (possibly empty)."""
        if self.stopped or self._finished:
            return ""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT_CHAR) or len(text) <= len(self._context_text):
            return ""
        delta = text[len(self._context_text):]
        # Slide the window: the tokens just emitted become the context for the next step.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        return self._apply_stop(delta, final=False)

    def flush(self) -> str:
        """Emit what is still held back (incomplete characters, stop-string prefixes) at the end of a request."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        text = self._decode(self._ids)
        return self._apply_stop(text[len(self._context_text):], final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _apply_stop(self, delta: str, final: bool) -> str:
        buf = self._pending + delta
        self._pending = ""
        if not self._stop:
            return buf
        # Earliest occurrence of any stop string; nothing from its start on is ever emitted.
        hit = min(((buf.find(s), s) for s in self._stop if s in buf), default=None)
        if hit is not None:
            self.stopped, self.stop_str = True, hit[1]
            return buf[: hit[0]]
        if final:
            return buf
        # Hold back the longest tail that is a proper prefix of some stop string; any later match
        # must start inside it, since earlier positions were already ruled out.
        longest = max(len(s) for s in self._stop) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stop):
                self._pending = tail
                return buf[:-k]
        return buf
