"""A small byte-level BPE tokenizer with the DeepSeek-V4 special tokens, for tests and tiny models."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from flashport.chat import BOS, EOS, PAD, SPECIAL_TOKENS

# Relative to this file so it works from a source checkout without installing package data.
CORPUS_PATH = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"


def train_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024, model_max_length: int = 1024) -> None:
    """Train on the bundled corpus and write tokenizer.json + tokenizer_config.json into out_dir.

    Ids: the special tokens come first in chat.SPECIAL_TOKENS order (BOS=0, EOS=1), then the 256
    byte symbols, then merges; the total is at most vocab_size. Training is deterministic, so the
    same files come out on every run.
    """
    n_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size must be at least {n_fixed} (special tokens + 256 bytes), got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    # Byte-level on both sides: every UTF-8 string (Chinese, emoji, control chars) round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, even those absent from the corpus, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Lines keep their newline so merges involving "\n" are learned too.
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        # Lets transformers' AutoTokenizer load the same files; BOS is in the prompt text already.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")
