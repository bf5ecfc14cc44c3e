"""The offline API on the embedded tiny model (official FP8/FP4 format) and on a transformers save."""

from __future__ import annotations

import math

import pytest
import torch

from flashport import LLM, SamplingParams
from flashport.errors import RequestError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir), device="cpu", dtype="float32", progress=False)


def test_text_and_token_prompts_give_the_same_greedy_output(llm):
    text = "The sea is calm tonight."
    ids = llm.tokenizer.encode(text)
    a, b = llm.generate([text, ids], GREEDY)
    assert a.prompt_token_ids == ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert len(a.outputs[0].token_ids) == 12 and a.outputs[0].finish_reason == "length"
    assert a.outputs[0].text == llm.tokenizer.decode(a.outputs[0].token_ids, skip_special_tokens=True)


def test_batched_generation_equals_one_at_a_time(llm):
    prompts = ["A short one.", "A somewhat longer prompt about cooking rice and beans on a stove.", "Hi"]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    single = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert batched == single


def test_chunked_prefill_budget_does_not_change_output(tiny_model_dir, llm):
    small = LLM(model=str(tiny_model_dir), device="cpu", dtype="float32", max_num_batched_tokens=5, progress=False)
    prompts = ["Travel by train through the mountains in winter.", "Science is a way of asking."]
    assert [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY)] == \
        [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(["Tell me a story."], p)[0].outputs[0].token_ids
    other = SamplingParams(max_tokens=7, temperature=1.0, seed=5, ignore_eos=True)
    mixed = llm.generate(["Something else first.", "Tell me a story."], [other, p])[1].outputs[0].token_ids
    assert alone == mixed
    different = llm.generate(["Tell me a story."], SamplingParams(max_tokens=10, temperature=0.9, seed=99,
                                                                 ignore_eos=True))[0].outputs[0].token_ids
    assert different != alone  # 10 draws at temperature 0.9 from a 1024-token vocabulary


def test_prompt_logprobs_match_the_full_forward(llm):
    ids = llm.tokenizer.encode("Logprobs of every prompt token, please.")
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))[0]
    pl = out.prompt_logprobs
    assert pl[0] is None and len(pl) == len(ids)
    model = llm.model
    ref = torch.log_softmax(model(torch.tensor(ids), [len(ids)], [model.new_state()]).float(), dim=-1)
    for t in range(1, len(ids)):
        assert ids[t] in pl[t]
        assert math.isclose(pl[t][ids[t]], ref[t - 1, ids[t]].item(), abs_tol=1e-4)
        top = ref[t - 1].topk(3).indices.tolist()
        assert set(top) <= set(pl[t]) and len(pl[t]) <= 4
    only = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert all(set(d) == {ids[t]} for t, d in enumerate(only) if t > 0)


def test_generated_logprobs(llm):
    out = llm.generate(["Numbers:"], SamplingParams(max_tokens=5, temperature=0, logprobs=2, ignore_eos=True))[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert tok in lp and 1 <= len(lp) <= 3
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token


def test_stop_string_and_stop_token(llm):
    base = llm.generate(["Once upon a time"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("greedy text has no usable middle")
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                            stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)] and stop not in out.text
    tok = ids[5]
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                            stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok and out.token_ids == ids[: ids.index(tok) + 1]


def test_eos_ends_generation_unless_ignored(llm, monkeypatch):
    base = llm.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    ids = base.outputs[0].token_ids
    assert llm.tokenizer.eos_token_id in llm.engine.eos_token_ids
    # Treat a token we know greedy decoding produces as EOS for this test.
    monkeypatch.setattr(llm.engine, "eos_token_ids", frozenset({ids[4]}))
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids == ids[: ids.index(ids[4]) + 1]
    kept = llm.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert kept.outputs[0].token_ids == ids


def test_chat(llm):
    out = llm.chat([{"role": "user", "content": "Hello!"}], GREEDY)[0]
    assert out.prompt_token_ids[0] == llm.tokenizer.bos_token_id
    assert llm.tokenizer.decode(out.prompt_token_ids).endswith("<｜Assistant｜></think>")


@pytest.mark.parametrize("prompt, why", [("", "empty"), ([], "empty"), ([10**6], "outside the vocabulary")])
def test_bad_prompts(llm, prompt, why):
    with pytest.raises(RequestError, match=why):
        llm.generate([prompt], GREEDY)


def test_prompt_longer_than_max_model_len(tiny_model_dir):
    small = LLM(model=str(tiny_model_dir), device="cpu", dtype="float32", max_model_len=8, progress=False)
    with pytest.raises(RequestError, match="max_model_len"):
        small.generate([list(range(2, 12))], GREEDY)
    with pytest.raises(RequestError, match="max_tokens is 100"):
        small.generate([[5, 6, 7]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    out = small.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kw, field", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                                       (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                                       (dict(logprobs=-1), "logprobs"), (dict(stop=[""]), "stop"),
                                       (dict(temperature=float("nan")), "temperature")])
def test_invalid_sampling_params(kw, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kw)


def test_loads_a_transformers_save_pretrained_directory(tmp_path):
    pytest.importorskip("transformers")
    from hf_oracle import make_hf_model

    hf = make_hf_model("swa-csa-hca", seed=3)
    hf.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", progress=False)
    prompt = list(range(5, 40))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 35:]
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref.tolist()
    assert out.outputs[0].text == ""  # no tokenizer in that directory: token ids only
