"""Tokenizer (trained tiny byte-level BPE), DeepSeek-V4 chat encoding and streaming detokenization."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from flashport.chat import (
    ASSISTANT,
    BOS,
    EOS,
    REASONING_EFFORT_MAX_PREFIX,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    encode_messages,
    split_reasoning,
)
from flashport.errors import CheckpointError, RequestError
from flashport.tiny_tokenizer import train_tiny_tokenizer
from flashport.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧。",
    "Emoji: 🙂🚀🎉 and a family 👨‍👩‍👧 and flags 🇯🇵",
    "mixed: café naïve 中文 🍕\n\ttabs\r\nand newlines  double  spaces ",
    "def f(x):\n    return {\"a\": x ** 2}  # code",
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(out, vocab_size=1024)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


# ---------------------------------------------------------------- tokenizer


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size <= 1024
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1
    for s in SPECIAL_TOKENS:
        ids = tok.encode(s)
        assert len(ids) == 1 and ids[0] == tok.token_to_id(s), s
        assert tok.id_to_token(ids[0]) == s
    assert tok.encode(BOS + "hi" + EOS)[0] == 0 and tok.encode(BOS + "hi" + EOS)[-1] == 1


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_no_implicit_bos(tok):
    assert tok.encode("hi")[0] != tok.bos_token_id
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_token_id
    # Chat prompts already start with BOS: add_bos must not double it.
    assert tok.encode(BOS + "hi", add_bos=True).count(tok.bos_token_id) == 1


def test_skip_special_tokens_keeps_think_markers(tok):
    ids = tok.encode(BOS + USER + "q" + ASSISTANT + THINK_START + "r" + THINK_END + "a" + EOS)
    assert tok.decode(ids, skip_special_tokens=True) == "q<think>r</think>a"


def test_training_is_deterministic(tok_dir, tmp_path):
    train_tiny_tokenizer(tmp_path, vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes()


def test_small_vocab(tmp_path):
    train_tiny_tokenizer(tmp_path, vocab_size=400)
    small = Tokenizer.from_dir(tmp_path)
    assert small.vocab_size <= 400
    assert small.decode(small.encode(TEXTS[3])) == TEXTS[3]


def test_from_dir_errors(tok_dir, tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_ids_fall_back_to_config_json(tok_dir, tmp_path):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 5]}))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token_id, t.eos_token_id) == (0, 1)


# ---------------------------------------------------------------- chat encoding


def test_single_user_turn():
    assert encode_messages([{"role": "user", "content": "Hi"}]) == f"{BOS}{USER}Hi{ASSISTANT}{THINK_END}"


def test_system_and_user():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs) == f"{BOS}Be brief.{USER}Hi{ASSISTANT}{THINK_END}"


def test_multiple_system_messages_and_text_parts():
    msgs = [
        {"role": "system", "content": "A."},
        {"role": "system", "content": [{"type": "text", "text": "B."}]},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
    ]
    assert encode_messages(msgs) == f"{BOS}A.B.{USER}x\n\ny{ASSISTANT}{THINK_END}"


def test_thinking_mode():
    prompt = encode_messages([{"role": "user", "content": "Hi"}], thinking=True)
    assert prompt == f"{BOS}{USER}Hi{ASSISTANT}{THINK_START}"


def test_multi_turn_drops_earlier_reasoning():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    history = f"{BOS}{USER}q1{ASSISTANT}{THINK_END}a1{EOS}{USER}q2{ASSISTANT}"
    assert encode_messages(msgs, thinking=True) == history + THINK_START
    assert encode_messages(msgs, thinking=False) == history + THINK_END


def test_reasoning_after_last_user_is_kept_and_continuation():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c", "reasoning_content": "r"}]
    head = f"{BOS}{USER}q{ASSISTANT}{THINK_START}"
    assert encode_messages(msgs, thinking=True, add_generation_prompt=False) == f"{head}r{THINK_END}c{EOS}"
    # Continuation: the last assistant message is a partial reply, so no EOS.
    assert encode_messages(msgs, thinking=True) == f"{head}r{THINK_END}c"
    partial = [msgs[0], {"role": "assistant", "content": "", "reasoning_content": "still thinking"}]
    assert encode_messages(partial, thinking=True) == f"{head}still thinking"
    assert encode_messages(msgs, thinking=False) == f"{BOS}{USER}q{ASSISTANT}{THINK_END}c"


def test_no_generation_prompt():
    assert encode_messages([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == f"{BOS}{USER}Hi"


def test_reasoning_effort_max_prefix():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert REASONING_EFFORT_MAX_PREFIX.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert (
        encode_messages(msgs, thinking=True, reasoning_effort="max")
        == f"{BOS}{REASONING_EFFORT_MAX_PREFIX}S{USER}Hi{ASSISTANT}{THINK_START}"
    )
    # Only in thinking mode, and only for "max".
    assert encode_messages(msgs, thinking=False, reasoning_effort="max") == encode_messages(msgs)
    assert encode_messages(msgs, thinking=True, reasoning_effort="high") == encode_messages(msgs, thinking=True)


def test_tool_results_merged_into_user_turn():
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": [{"type": "text", "text": "22C"}]},
        {"role": "user", "content": "Thanks"},
    ]
    assert encode_messages(msgs) == (
        f"{BOS}{USER}Weather?{ASSISTANT}{THINK_END}Checking.{EOS}"
        f"{USER}<tool_result>sunny</tool_result>\n\n<tool_result>22C</tool_result>\n\nThanks{ASSISTANT}{THINK_END}"
    )


def test_prompt_tokenizes_with_single_bos(tok):
    ids = tok.encode(encode_messages([{"role": "user", "content": "Hi"}], thinking=True))
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[-1] == tok.token_to_id(THINK_START)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"messages\[1\].*'robot'"),
        ([{"role": "user", "content": 5}], r"messages\[0\].*int"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "image_url"),
        ([{"role": "user"}], "missing"),
        ([{"role": "assistant", "content": "a"}], "must follow"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "last message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{}]}], "tool_calls"),
        ("hello", "non-empty"),
    ],
)
def test_encode_errors(messages, match):
    with pytest.raises(RequestError, match=match):
        encode_messages(messages)


def test_bad_reasoning_effort():
    with pytest.raises(RequestError, match="reasoning_effort"):
        encode_messages([{"role": "user", "content": "a"}], thinking=True, reasoning_effort="extreme")


def test_split_reasoning():
    assert split_reasoning("plan</think>answer", thinking=True) == ("plan", "answer")
    assert split_reasoning("a</think>b</think>c", thinking=True) == ("a", "b</think>c")
    assert split_reasoning("still thinking", thinking=True) == ("still thinking", "")
    assert split_reasoning("answer", thinking=False) == (None, "answer")


# ---------------------------------------------------------------- incremental detokenization


def stream(det: IncrementalDetokenizer, ids, chunk_sizes=(1,), rng=None) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = rng.choice(chunk_sizes) if rng else chunk_sizes[0]
        deltas.append(det.add(ids[i : i + n]))
        i += n
    deltas.append(det.flush())
    return deltas


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS + [BOS + "a<think>b</think>c" + EOS])
def test_stream_equals_full_decode(tok, text, skip):
    ids = tok.encode(text)
    deltas = stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    # Valid text never shows a half-decoded character.
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_char_split_across_tokens_is_held_back(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1  # the tiny vocab has no merge covering the whole 4-byte character
    det = IncrementalDetokenizer(tok)
    assert [det.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.add(ids[-1]) == "🚀"


@pytest.mark.parametrize("seed", range(6))
def test_random_token_streams(tok, seed):
    rng = random.Random(seed)
    # Random ids (specials, lone UTF-8 bytes and merges alike) give invalid byte sequences too.
    ids = [rng.randrange(tok.vocab_size) for _ in range(300)]
    prompt = tok.encode("Prompt: 中文 🙂") if seed % 2 else None
    skip = seed % 3 != 0
    det = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    out = "".join(stream(det, ids, chunk_sizes=(1, 1, 2, 3), rng=rng))
    if prompt is None:
        assert out == tok.decode(ids, skip_special_tokens=skip)
    else:
        full = tok.decode(prompt + ids, skip_special_tokens=skip)
        assert out == full[len(tok.decode(prompt, skip_special_tokens=skip)) :]


def test_window_stays_small(tok):
    det = IncrementalDetokenizer(tok)
    for i in tok.encode(" ".join(TEXTS) * 20):
        det.add(i)
        assert len(det._ids) < 16  # O(1) work per token: only a small window is re-decoded


def emitted_prefixes(det: IncrementalDetokenizer, ids) -> list[str]:
    """Concatenated output after each step."""
    seen, out = [], ""
    for i in ids:
        out += det.add(i)
        seen.append(out)
    out += det.flush()
    seen.append(out)
    return seen


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("The answer is 42. END of story, more text.", ["END"], "The answer is 42. "),
        ("Hello there. User: what next?", ["\nUser:", " User:"], "Hello there."),
        ("aaa STOP bbb HALT ccc", ["HALT", "STOP"], "aaa "),  # earliest match wins
        ("说明：🙂完成了，后面的不要", ["完成"], "说明：🙂"),
        ("x <think>y</think>z", ["</think>"], "x <think>y"),
    ],
)
def test_stop_strings(tok, text, stop, expected):
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, stop=stop)
    seen = emitted_prefixes(det, ids)
    assert seen[-1] == expected
    assert det.stopped and det.stop_str in stop
    # At no point did any text of the stop string (or after it) leak out.
    assert all(expected.startswith(s) for s in seen)
    assert det.add(tok.encode(" more")) == "" and det.flush() == ""


def test_stop_string_spread_over_tokens(tok):
    stop = "<<END>>"
    assert len(tok.encode(stop)) > 2
    ids = tok.encode("first part<<END>>second part")
    det = IncrementalDetokenizer(tok, stop=[stop])
    seen = emitted_prefixes(det, ids)
    assert seen[-1] == "first part" and all("<" not in s for s in seen)


def test_partial_stop_is_held_then_released(tok):
    det = IncrementalDetokenizer(tok, stop=["STOP"])
    out = "".join(det.add(i) for i in tok.encode("go ST"))
    assert out == "go "  # "ST" may begin "STOP": held back
    out += "".join(det.add(i) for i in tok.encode("ART"))
    assert out == "go START"  # decided: not a stop
    assert det.add(tok.encode(" ST")) == " "
    assert det.flush() == "ST"  # end of request: a prefix of a stop string is ordinary text
    assert not det.stopped


def test_empty_stop_string_rejected(tok):
    with pytest.raises(RequestError, match="stop"):
        IncrementalDetokenizer(tok, stop=[""])
