"""lorakit's decode loop against transformers' `generate` on the same model: greedy tokens identical at batch 1 and
at batch 8 with left padding (base, adapter unmerged, merged, mixed by row); continuous batching exact in float64;
sampling filters equal to transformers' warpers and reproducible with a seed; streaming equal to the batch path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, randomize_lora, tiny_llama_family
from lorakit import LoRAConfig, LoRAError, adapters_by_row, add_lora, disable_adapters, set_adapter
from lorakit.data.prompts import format_prompt
from lorakit.inference.compiled_step import compiled_model, extension
from lorakit.inference.sampling import Choice
from lorakit.inference.decode import decode, supports
from lorakit.inference.sampling import Sampling
from lorakit.inference.generation import generate, merged, stream
from lorakit.models.loading import load_model

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data.json"


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct with two adapters whose B is random (so each changes the output) and 20 prompts."""
    model, tok = load_model("smollm2")
    add_lora(model, LoRAConfig(r=8, alpha=16, targets="all-linear"), "a")
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="attention"), "b")
    randomize_lora(model, seed=3)
    records = json.loads(ALPACA.read_text())[:20]
    prompts = [format_prompt(tok, r["instruction"], r["input"], "chat") for r in records]
    return model.eval(), tok, prompts


def transformers_tokens(model, tok, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy `generate` on the batch, left-padded; each row's tokens up to and including its EOS."""
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        rows.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return rows


def loop_tokens(model, tok, prompts: list[str], new_tokens: int, slots: int) -> list[list[int]]:
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = [[] for _ in prompts]
    for j, token in decode(model, ids, Choice.greedy(new_tokens), {tok.eos_token_id}, tok.pad_token_id, slots=slots):
        rows[j].append(token)
    return rows


def batches(prompts: list[str], size: int):
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


@torch.no_grad()
@pytest.mark.parametrize("batch, count, adapter", [(1, 6, None), (8, 20, None), (8, 8, "unmerged"),
                                                   (8, 8, "merged"), (1, 3, "unmerged")])
def test_greedy_tokens_equal_transformers_generate(smollm2, batch, count, adapter):
    model, tok, prompts = smollm2
    set_adapter(model, "a")
    context = disable_adapters(model) if adapter is None else merged(model, adapter == "merged")
    with context:
        # where the C++ step is built (always under CI: tests/test_compiled_step.py), these run through it
        assert extension() is None or compiled_model(model, torch.float32) is not None
        for chunk in batches(prompts[:count], batch):
            expected = transformers_tokens(model, tok, chunk, 64)
            assert loop_tokens(model, tok, chunk, 64, slots=batch) == expected
    if count == 20:  # the sample has rows that end at EOS and rows that run to max_new_tokens
        lengths = [len(r) for c in batches(prompts, 8) for r in loop_tokens(model, tok, c, 64, 8)]
        assert min(lengths) < 64 and max(lengths) == 64


@torch.no_grad()
def test_rows_mixing_adapters_equal_transformers_generate(smollm2):
    model, tok, prompts = smollm2
    names = ["a", None, "b", "a", "b", None, "a", "b"]
    with adapters_by_row(model, names):
        expected = transformers_tokens(model, tok, prompts[:8], 48)
        assert loop_tokens(model, tok, prompts[:8], 48, slots=8) == expected
        texts = generate(model, tok, prompts[:8], Sampling(max_new_tokens=48), "chat")  # rows kept in order
        with pytest.raises(LoRAError, match="7 prompts for adapters_by_row over 8 rows"):
            generate(model, tok, prompts[:7], Sampling(max_new_tokens=4), "chat")
    assert texts == [t.strip() for t in tok.batch_decode(expected, skip_special_tokens=True)]
    assert len(set(texts)) == len(texts)  # the three adapters (and none) really answer differently


@pytest.mark.parametrize("name, refill_rows, penalty", [("llama", None, 1.0), ("qwen2", None, 1.0),
                                                         ("qwen3", None, 1.0), ("gpt2", None, 1.0),
                                                         ("llama", 2, 1.0), ("gpt2", 2, 1.3), ("qwen3", 3, 1.3)])
@torch.no_grad()
def test_continuous_batching_equals_one_prompt_at_a_time(name, refill_rows, penalty):
    """Three slots for ten prompts: rows end at an EOS (the token the model makes most often, so some rows end
    early) or at max_new_tokens and are refilled from the queue, one at a time or `refill_rows` prompts prefilled
    together into the slots that wait (each stored without its padding; with a repetition penalty each slot's
    tokens start again from its new prompt); in float64 (rounding far below any logit gap) each prompt's tokens
    equal generate's for that prompt alone."""
    model = tiny_decoder(name).double()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 128, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (10,), generator=g)]
    choose = Choice(Sampling(max_new_tokens=10, repetition_penalty=penalty))
    made = [t for _, t in decode(model, prompts, choose, set(), 0, slots=3)]
    eos = max(set(made), key=made.count)
    prefilled: list[list[int]] = []
    got: list[list[int]] = [[] for _ in prompts]
    for j, token in decode(model, prompts, choose, {eos}, 0, slots=3, on_prefill=prefilled.append,
                           refill_rows=refill_rows):
        got[j].append(token)
    for p, tokens in zip(prompts, got):
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, repetition_penalty=penalty)[0, len(p):].tolist()
        assert tokens == (out[:out.index(eos) + 1] if eos in out else out)
    assert prefilled[0] == [0, 1, 2] and sorted(sum(prefilled, [])) == list(range(10))  # each prompt once
    if refill_rows is None:  # a quarter of three slots: the slots that end together are refilled at once
        assert len(prefilled) > 3 and max(map(len, prefilled[1:])) > 1
    else:  # refills wait for refill_rows free slots (all three rows here end before the queue's last prompts)
        assert len(prefilled[1]) >= refill_rows and len(prefilled) < 6
    assert any(len(t) < 10 for t in got) and any(len(t) == 10 for t in got)


def test_refills_wait_for_company_but_not_long():
    """Ended rows are refilled together once refill_rows of them wait (or the queue's rest), after DEFER_STEPS steps
    of waiting at most, or at once when no row is left generating; never beyond the queue."""
    from lorakit.inference.decode import DEFER_STEPS, _refills_due
    running = [0, -1, 2, -1]
    assert _refills_due(2, 10, 4, 0, running) == 0  # two of four wait: hold on
    assert _refills_due(4, 10, 4, 0, running) == 4 and _refills_due(6, 10, 4, 0, running) == 6
    assert _refills_due(2, 2, 4, 0, running) == 2  # the queue's last two: no one else is coming
    assert _refills_due(2, 10, 4, DEFER_STEPS - 1, running) == 0 and _refills_due(2, 10, 4, DEFER_STEPS, running) == 2
    assert _refills_due(2, 10, 4, 0, [-1, -1, -1, -1]) == 2  # nothing else runs: no reason to wait
    assert _refills_due(0, 10, 4, 99, running) == 0 and _refills_due(3, 0, 4, 99, running) == 0
    assert _refills_due(6, 3, 4, 0, running) == 3  # no more than are queued


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_a_prefill_after_known_keys_equals_the_whole_prompts_prefilled(name):
    """prefill_unpadded of prompts' last tokens after their first 16 tokens' keys and values, computed before (the
    server's prefix cache), gives the logits and slot contents of the whole prompts prefilled in float64 (rows of
    different lengths, left-padded, into other slots). The attention weights are scaled up so that attention is
    sharp: a wrong position or a misplaced key changes the logits."""
    from lorakit.inference.decode import _left_padded, prefill_unpadded
    from lorakit.inference.kv_cache import KVCache
    model = tiny_decoder(name).double()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ in ("LlamaAttention", "Qwen3Attention"):
                module.q_proj.weight.mul_(8), module.k_proj.weight.mul_(8)
            elif type(module).__name__ == "GPT2Attention":
                module.c_attn.weight.mul_(8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 128, (n,), generator=g).tolist() for n in (20, 27, 17)]
    like = next(model.parameters())
    whole = KVCache.for_model(model.config, 3, 40, like)
    expected = prefill_unpadded(model, whole, [0, 1, 2], *_left_padded(prompts, 0, "cpu"))
    parts = KVCache.for_model(model.config, 4, 40, like)
    prefill_unpadded(model, parts, [0, 1, 2], *_left_padded([p[:16] for p in prompts], 0, "cpu"))
    known = parts.keys[:, :3, :, :16].clone(), parts.values[:, :3, :, :16].clone()
    got = prefill_unpadded(model, parts, [3, 1, 0], *_left_padded([p[16:] for p in prompts], 0, "cpu"), known)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert parts.end[[3, 1, 0]].tolist() == whole.end.tolist() == [20, 27, 17]
    for slot, row in zip((3, 1, 0), range(3)):
        n = len(prompts[row])
        torch.testing.assert_close(parts.keys[:, slot, :, :n], whole.keys[:, row, :, :n], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(parts.values[:, slot, :, :n], whole.values[:, row, :, :n], rtol=1e-10, atol=1e-10)
    wrong = prefill_unpadded(model, parts, [3, 1, 0], *_left_padded([p[16:] for p in prompts], 0, "cpu"),
                             (known[0].roll(1, 3), known[1]))  # keys one position off: the test can fail
    assert not torch.allclose(wrong, expected, rtol=1e-3, atol=1e-3)


def tiny_decoder(name: str):
    return TINY[name]() if name in ("llama", "gpt2") else tiny_llama_family(name)


def test_models_the_loop_cannot_drive_keep_transformers_path():
    assert supports(TINY["llama"]()) and supports(tiny_decoder("qwen2")) and supports(TINY["gpt2"](), 64)
    assert not supports(TINY["gpt2"](), 65)  # past GPT-2's position table
    assert not supports(TINY["t5"]())


def test_sampling_filters_equal_transformers_warpers():
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    history = torch.randint(0, 300, (4, 20), generator=g)
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter(1, history, True)
    for temperature, top_k, top_p, penalty in [(0.7, 0, 0.9, 1.0), (1.3, 40, 1.0, 1.2), (0.9, 50, 0.8, 1.1)]:
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                       TopPLogitsWarper(top_p) if top_p < 1 else None):
            expected = warper(history, expected) if warper is not None else expected
        got = Choice(Sampling(1, temperature, top_p, top_k, penalty)).scores(logits, seen if penalty != 1 else None)
        torch.testing.assert_close(got.softmax(-1), expected.softmax(-1))
        assert (got == float("-inf")).sum() == (expected == float("-inf")).sum() > 0


@torch.no_grad()
def test_sampling_with_a_seed_is_reproducible_and_streaming_equals_the_batch_path(smollm2):
    model, tok, prompts = smollm2
    with disable_adapters(model):
        sampled = Sampling(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=40, seed=11)
        first = generate(model, tok, prompts[:3], sampled, "chat")
        assert generate(model, tok, prompts[:3], sampled, "chat") == first
        other = generate(model, tok, prompts[:3], Sampling(24, 0.9, 0.9, 40, seed=12), "chat")
        assert other != first
        greedy, stats = Sampling(max_new_tokens=40), {}
        pieces = list(stream(model, tok, prompts[0], greedy, "chat", stats=stats))
        assert len(pieces) > 5 and "".join(pieces).strip() == generate(model, tok, prompts[:1], greedy, "chat")[0]
        assert stats["tokens"] == len(transformers_tokens(model, tok, prompts[:1], 40)[0])
        alone = generate(model, tok, prompts[1:2], sampled, "chat")[0]
        assert "".join(stream(model, tok, prompts[1], sampled, "chat")).strip() == alone

