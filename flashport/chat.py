"""DeepSeek-V4 prompt format: OpenAI-style messages -> prompt text, and completion -> reasoning/content.

The layout follows spec §9 (the model repo's `encoding/encoding_dsv4.py`):

    BOS [effort prefix] system... <｜User｜>text<｜Assistant｜></think>reply<｜end▁of▁sentence｜> ...
        <｜User｜>text<｜Assistant｜><think>          <- generation starts here (thinking mode)

The result is text that already contains BOS and the role markers: tokenize it with
`Tokenizer.encode(prompt)` (never add special tokens again).
"""

from __future__ import annotations

from typing import Any

from flashport.errors import RequestError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
TOOL_RESULT_START = "<tool_result>"
TOOL_RESULT_END = "</tool_result>"
PAD = "<｜▁pad▁｜>"
# Task tokens the official encoder appends for internal classification requests (unused here,
# but they exist in the vocabulary and must never be split by the tokenizer).
TASK_TOKENS = (
    "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>",
)

# BOS and EOS first: the tiny tokenizer trainer assigns ids in this order (BOS=0, EOS=1 as in V4).
SPECIAL_TOKENS: list[str] = [
    BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
    TOOL_RESULT_START, TOOL_RESULT_END, PAD, *TASK_TOKENS,
]
# Added tokens that are part of the visible output syntax (reasoning and tool-call parsing need
# them), as opposed to control tokens (BOS/EOS/role markers/pad) that decoding may drop.
MARKUP_TOKENS: frozenset[str] = frozenset({THINK_START, THINK_END, DSML, TOOL_RESULT_START, TOOL_RESULT_END})

# The instruction put right after BOS for reasoning_effort="max" in thinking mode. Only its first
# line is public (spec §9); the official encoder's longer wording is not reproduced here.
REASONING_EFFORT_MAX_PREFIX = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\n"
# Accepted so that OpenAI clients sending the usual levels are not rejected; only "max" changes
# the prompt (the April V4 encoder has no other levels).
REASONING_EFFORTS = ("low", "medium", "high", "max")

# "developer" is what newer OpenAI clients send instead of "system"-like user instructions; the
# official encoder renders it as a user turn, so it is an alias of "user" here.
_ROLES = ("system", "user", "assistant", "tool", "developer")
# Separator between the pieces of one merged user turn (user texts and tool results), and
# between the text parts of one message, as in the official encoder's content blocks.
_PART_SEP = "\n\n"


def encode_messages(
    messages: list[dict[str, Any]],
    thinking: bool = False,
    reasoning_effort: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render a chat as DeepSeek-V4 prompt text (BOS included).

    Rules beyond spec §9:
    * System messages are rendered where they appear (normally first), with nothing in between,
      so several leading system messages are simply concatenated.
    * Consecutive user/tool/developer messages form one user turn; their pieces are joined by a
      blank line and each tool message becomes `<tool_result>...</tool_result>`.
    * A user turn is followed by `<｜Assistant｜>` when an assistant message follows it or it ends
      the prompt with `add_generation_prompt`. The marker is followed by `<think>` only for the last
      user turn in thinking mode; earlier turns get `</think>` because their reasoning is dropped.
    * Assistant messages after the last user turn keep `reasoning_content` in thinking mode
      (`reasoning</think>content`); earlier ones render only their content. Each ends with EOS.
    * add_generation_prompt=True and the last message is an assistant: that message is a partial
      reply to continue, so it is rendered without EOS (and, in thinking mode with empty content,
      without `</think>`, so the model continues its reasoning).
    * add_generation_prompt=False renders a closed transcript: no trailing `<｜Assistant｜>`.
    * reasoning_effort is one of low/medium/high/max or None; only "max" in thinking mode adds
      REASONING_EFFORT_MAX_PREFIX.
    * Assistant `tool_calls` and per-message `tools` are rejected (no DSML rendering yet).
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise RequestError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)} or null, got {reasoning_effort!r}"
        )
    turns = _to_turns(messages)
    last_role = turns[-1][0]
    if add_generation_prompt and last_role == "system":
        raise RequestError("the last message must be a user, tool or assistant message to generate a reply")
    last_user = max((j for j, t in enumerate(turns) if t[0] == "user"), default=-1)

    out = [BOS]
    if thinking and reasoning_effort == "max":
        out.append(REASONING_EFFORT_MAX_PREFIX)
    for j, (kind, text, reasoning) in enumerate(turns):
        is_last = j == len(turns) - 1
        if kind == "system":
            out.append(text)
        elif kind == "user":
            out += [USER, text]
            if (not is_last and turns[j + 1][0] == "assistant") or (is_last and add_generation_prompt):
                out += [ASSISTANT, THINK_START if thinking and j == last_user else THINK_END]
        else:  # assistant
            continuing = is_last and add_generation_prompt
            if thinking and j > last_user:
                out.append(reasoning)
                if not (continuing and not text):
                    out.append(THINK_END)
            out.append(text)
            if not continuing:
                out.append(EOS)
    return "".join(out)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """Split a completion into (reasoning_content, content).

    In thinking mode the prompt ended with `<think>`, so everything up to the first `</think>` is
    reasoning; without `</think>` (yet, or cut off by max_tokens) all of it is reasoning.
    """
    if not thinking:
        return None, text
    reasoning, sep, content = text.partition(THINK_END)
    return (reasoning, content) if sep else (text, "")


def _to_turns(messages: list[Any]) -> list[tuple[str, str, str]]:
    """Validate messages and group them into (kind, text, reasoning) turns, kind in system/user/assistant."""
    turns: list[tuple[str, str, str]] = []
    user_parts: list[str] = []  # pieces of the user turn being merged

    def close_user_turn() -> None:
        if user_parts:
            turns.append(("user", _PART_SEP.join(user_parts), ""))
            user_parts.clear()

    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(_ROLES)})"
            )
        where = f"messages[{i}] ({role})"
        if msg.get("tools"):
            raise RequestError(f"{where}: tool definitions are not supported")
        if role in ("user", "developer", "tool"):
            text = _content_text(msg, where, optional=False)
            user_parts.append(TOOL_RESULT_START + text + TOOL_RESULT_END if role == "tool" else text)
            continue
        close_user_turn()
        if role == "system":
            turns.append(("system", _content_text(msg, where, optional=False), ""))
            continue
        # assistant
        if msg.get("tool_calls"):
            raise RequestError(f"{where}: tool_calls are not supported")
        if not turns or turns[-1][0] != "user":
            raise RequestError(f"{where}: an assistant message must follow a user or tool message")
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise RequestError(f"{where}: reasoning_content must be a string, got {type(reasoning).__name__}")
        turns.append(("assistant", _content_text(msg, where, optional=True), reasoning or ""))
    close_user_turn()
    return turns


def _content_text(msg: dict[str, Any], where: str, optional: bool) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": str} parts."""
    content = msg.get("content")
    if content is None:
        # OpenAI allows a null content on assistant messages (e.g. tool-call-only replies).
        if optional:
            return ""
        raise RequestError(f"{where}: content is missing")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    f"{where}: content[{k}] must be a {{'type': 'text', 'text': str}} part, got {kind!r}"
                )
            texts.append(part["text"])
        return _PART_SEP.join(texts)
    raise RequestError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
