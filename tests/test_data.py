"""Data formats: the real files, splits, label masks, truncation, packing and every bad-input case."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import DATA, TINY, randomize_lora
from lorakit.data.collate import pack, packed_batch, pad_batch, row_length, seq2seq_batch, shared_prefix
from lorakit.data.examples import IGNORE, EncodedExample
from lorakit.data.classification import ClassificationData, balance
from lorakit.errors import DataError
from lorakit.data.prompts import InstructionData, SummarizationData

SMS = DATA / "sms_spam_collection" / "SMSSpamCollection"
ALPACA = DATA / "alpaca" / "alpaca_data.json"
DIALOGSUM = DATA / "dialogsum"


@pytest.fixture(scope="module")
def smol_tok():
    from lorakit.models.loading import load_tokenizer, resolve_spec
    return load_tokenizer(resolve_spec("smollm2")[0])


def test_sms_real_file_and_stratified_split():
    data = ClassificationData.load(SMS)
    assert data.stats.read == data.stats.kept == 5374 and data.labels == ["ham", "spam"]
    counts = Counter(e.label for e in data.examples)
    assert counts == {0: 4652, 1: 722}
    assert any("\t" in e.text or '"' in e.text for e in data.examples)  # split on the first tab only, no quoting
    parts = data.split()
    assert sum(map(len, parts.values())) == 5374
    for part, frac in zip(("train", "val", "test"), (0.7, 0.1, 0.2)):
        c = Counter(e.label for e in parts[part])
        assert abs(c[1] / len(parts[part]) - 722 / 5374) < 0.005, part  # same spam rate everywhere
        assert abs(len(parts[part]) - frac * 5374) <= 2
    again = data.split()
    assert [e.text for e in again["test"]] == [e.text for e in parts["test"]]
    assert [e.text for e in data.split(seed=1)["test"]] != [e.text for e in parts["test"]]
    ids = {id(e) for p in parts.values() for e in p}
    assert len(ids) == 5374
    bal = balance(parts["train"])
    assert Counter(e.label for e in bal) == {0: 505, 1: 505}


def test_alpaca_real_file_strict_and_lenient():
    with pytest.raises(DataError, match=r"alpaca_data\.json, index \d+: field 'output' is empty"):
        InstructionData.load(ALPACA)
    data = InstructionData.load(ALPACA, strict=False)
    assert data.stats.read == 51902 and data.stats.kept == 51874
    assert data.stats.skipped == {"empty field 'output'": 28}
    assert "skipped 28 (empty field 'output': 28)" in str(data.stats)
    assert sum(1 for e in data.examples if e.prompt_input) == 20642 - sum(
        1 for r in json.loads(ALPACA.read_text()) if r["input"].strip() and not r["output"].strip())


def test_dialogsum_real_files():
    sizes = {"train": 12460, "dev": 500, "test": 400}
    for split, n in sizes.items():
        data = SummarizationData.load(DIALOGSUM / f"dialogsum.{split}.jsonl")
        assert data.stats.read == data.stats.kept == n
        assert all(len(e.references) == (3 if split == "test" else 1) for e in data.examples)
    test = SummarizationData.load(DIALOGSUM / "dialogsum.test.jsonl")
    first = json.loads((DIALOGSUM / "dialogsum.test.jsonl").read_text().splitlines()[0])
    assert test.examples[0].references == [first["summary1"], first["summary2"], first["summary3"]]


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_labels_cover_exactly_the_response(smol_tok, template, tmp_path):
    recs = [{"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky."},
            {"instruction": "Translate to French.", "input": "Good morning, friends!", "output": "Bonjour, mes amis !"}]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    data = InstructionData.load(path)
    for rec, enc in zip(recs, data.encode(smol_tok, template=template)):
        kept = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
        assert kept == [lab for lab in enc.labels if lab != IGNORE]
        assert smol_tok.decode(kept) == rec["output"] + smol_tok.eos_token
        prompt = smol_tok.decode(enc.input_ids[: len(enc.input_ids) - len(kept)])
        assert rec["instruction"] in prompt and (rec["input"] in prompt)
        assert ("### Response:" in prompt) == (template == "alpaca")
    full = data.encode(smol_tok, template=template, train_on_prompt=True)
    assert all(e.labels == e.input_ids for e in full)


def test_truncation_keeps_the_response_and_counts(smol_tok, tmp_path):
    long_input = " ".join(["word"] * 400)
    recs = [{"instruction": "Summarise.", "input": long_input, "output": "Many words."},
            {"instruction": "Say hi.", "input": "", "output": " ".join(["hi"] * 300)},
            {"instruction": "Short.", "input": "", "output": "Ok."}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs))
    data = InstructionData.load(path)
    enc = data.encode(smol_tok, max_length=128)
    assert all(len(e.input_ids) <= 128 for e in enc)
    resp0 = [t for t, lab in zip(enc[0].input_ids, enc[0].labels) if lab != IGNORE]
    assert smol_tok.decode(resp0) == "Many words." + smol_tok.eos_token  # whole response survives
    prompt1 = sum(lab == IGNORE for lab in enc[1].labels)
    assert len(enc[1].input_ids) == 128 and prompt1 < 64  # short prompt intact, response gets the rest
    assert smol_tok.decode(enc[1].input_ids[:prompt1]).endswith("### Response:\n")
    assert data.stats.notes == {"prompt truncated (response kept)": 1, "response truncated": 1}
    assert "prompt truncated (response kept): 1" in str(data.stats)
    big = data.encode(smol_tok, max_length=64)[0]  # prompt alone is ~420 tokens: response keeps >= half of 64
    assert smol_tok.decode([t for t, lab in zip(big.input_ids, big.labels) if lab != IGNORE]).startswith("Many")


def _tiny_examples(lengths, prompt_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, p in zip(lengths, prompt_lens):
        ids = torch.randint(4, 128, (n,), generator=g).tolist()
        out.append(EncodedExample(ids, [IGNORE] * p + ids[p:]))
    return out


def test_packing_gives_the_unpacked_losses():
    model = TINY["llama"]()
    examples = _tiny_examples([9, 14, 7, 11, 7, 12], [3, 8, 1, 5, 1, 6])  # 6 label tokens each
    rows = pack(examples, max_length=24)
    assert len(rows) < len(examples) and all(sum(len(e.input_ids) for e in r) <= 24 for r in rows)
    with torch.no_grad():
        packed = model(**packed_batch(rows, pad_id=0)).loss
        alone = [model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in examples]
        padded = model(**pad_batch(examples, pad_id=0)).loss
    counts = [sum(lab != IGNORE for lab in e.labels[1:]) for e in examples]
    assert len(set(counts)) == 1  # equal label counts: token mean == mean of the examples' losses
    torch.testing.assert_close(packed, torch.stack(alone).mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_packing_unequal_examples_token_weighted():
    model = TINY["llama"]()
    examples = _tiny_examples([7, 15, 4, 10], [0, 2, 0, 9])
    with torch.no_grad():
        packed = model(**packed_batch(pack(examples, 20), pad_id=0)).loss
        alone = [model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in examples]
    n = torch.tensor([sum(lab != IGNORE for lab in e.labels[1:]) for e in examples], dtype=torch.float)
    torch.testing.assert_close(packed, (torch.stack(alone) * n).sum() / n.sum(), atol=1e-5, rtol=0)


def _templated(prompts_and_lengths, seed=1):
    """Examples opening with one 6-token preamble (two use another after its first 3 tokens), then their own
    prompt and response tokens."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(4, 128, (6,), generator=g).tolist()
    out = []
    for j, (prompt, n) in enumerate(prompts_and_lengths):
        head = pre if j % 3 else pre[:3] + [3, 2, 1]
        ids = head + torch.randint(4, 128, (n - len(head),), generator=g).tolist()
        out.append(EncodedExample(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prefix_packing_gives_the_unshared_loss_and_gradients(kind):
    """Packed rows keeping a shared preamble once: the same loss and LoRA gradients as repeating it (dropout 0),
    and the token-weighted mean of the examples' own losses, from fewer tokens."""
    from lorakit import LoRAConfig, add_lora
    model = TINY[kind]()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_lora(model)
    examples = _templated([(8, 14), (9, 11), (7, 16), (10, 13), (8, 9), (11, 15), (6, 12)])
    rows = [[examples[i] for i in (1, 2, 4)], [examples[i] for i in (0, 3, 5, 6)]]
    assert [shared_prefix(r) for r in rows] == [6, 3]  # the whole preamble; the part both preambles have
    plain, shared = packed_batch(rows, pad_id=0), packed_batch(rows, pad_id=0, share_prefix=True)
    assert shared["input_ids"].numel() < plain["input_ids"].numel()
    assert (shared["labels"] != IGNORE).sum() == (plain["labels"] != IGNORE).sum()
    got = []
    for b in (plain, shared):
        model.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        got.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_g), (loss, g) = got
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    assert set(g) == set(ref_g) and len(g) > 4
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in examples]
    n = torch.tensor([sum(lab != IGNORE for lab in e.labels[1:]) for e in examples], dtype=torch.float)
    torch.testing.assert_close(loss, (torch.stack(alone) * n).sum() / n.sum(), atol=1e-5, rtol=0)


def test_shared_prefix_stops_before_labels_and_packing_groups_preambles():
    e = lambda ids, prompt: EncodedExample(ids, [IGNORE] * prompt + ids[prompt:])  # noqa: E731
    same_prompt = [e([5, 6, 7, 8, 9], 3), e([5, 6, 7, 8, 10, 11], 3)]
    assert shared_prefix(same_prompt) == 2  # token 3 is predicted from token 2, which must be in the own block
    assert shared_prefix([e([5, 6, 7, 8], 0), e([5, 6, 7, 9], 0)]) == 0  # train_on_prompt: every token has a loss
    assert shared_prefix([e([5, 6, 7, 8], 4), e([5, 6, 7, 8], 4)]) == 3  # unlabelled: each keeps one token
    assert shared_prefix([e([5, 6, 7, 8], 2)]) == 0 and shared_prefix([e([5, 6], 1), e([4, 6], 1)]) == 0
    assert row_length(same_prompt, True) == 9 and row_length(same_prompt) == 11
    a, b = [1, 2, 3, 4, 5, 6, 7], [1, 2, 9, 9, 9, 9, 9]
    A1, B1, A2, B2 = e(a + [20] * 6, 7), e(b + [21] * 6, 7), e(a + [22], 7), e(b + [23], 7)
    rows = pack([B1, A1, A2, B2], 20, share_prefix=True)
    assert [[ex.input_ids[-1] for ex in r] for r in rows] == [[21, 23], [20, 22]]  # A2 fits both: goes to its kin
    assert [[ex.input_ids[-1] for ex in r] for r in pack([B1, A1, A2, B2], 20)] == [[21], [20], [22, 23]]
    rows = pack([A2, A2], 16, share_prefix=True)
    assert len(rows) == 1 and row_length(rows[0], True) == 10
    batch = packed_batch(rows[:1], pad_id=0, share_prefix=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 22, 7, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 6, 7]]
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[9, :6].all() and not allowed[9, 6:8].any() and allowed[9, 8:].all()  # prefix, not the other


def test_seq2seq_batch_pads_labels_with_ignore():
    batch = seq2seq_batch([EncodedExample([5, 6, 7], [8, 1]), EncodedExample([5], [9, 9, 9, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 1, IGNORE, IGNORE], [9, 9, 9, 1]]


def test_csv_and_jsonl_classification(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"hello, there",pos\nawful,neg\n"fine ""ok""",pos\n')
    data = ClassificationData.load(tmp_path / "d.csv")
    assert data.labels == ["neg", "pos"] and [e.text for e in data.examples][2] == 'fine "ok"'
    (tmp_path / "d.jsonl").write_text('{"sentence": "good", "y": "pos"}\n\n{"sentence": "bad", "y": "neg"}\n')
    data = ClassificationData.load(tmp_path / "d.jsonl", text_field="sentence", label_field="y",
                                   labels=["neg", "pos"])
    assert [(e.text, e.label) for e in data.examples] == [("good", 1), ("bad", 0)]


# ------------------------------------------------------------------------------------------------ bad input

BAD_INPUT = {
    "missing field": ("a.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', InstructionData, {},
                      r"a\.jsonl, line 2: missing field 'output' \(fields: instruction\)"),
    "empty text": ("sms.tsv", b"ham\thello\nspam\t   \n", ClassificationData, {},
                   r"sms\.tsv, line 2: field 'text' is empty"),
    "unknown label": ("sms.tsv", b"ham\thello\nspma\tWIN now\n", ClassificationData, {"labels": ["ham", "spam"]},
                      r"sms\.tsv, line 2: field 'label': unknown label 'spma' \(known: ham, spam\)"),
    "non-UTF-8 bytes": ("sms.tsv", b"ham\thello\nham\tcaf\xe9 au lait\n", ClassificationData, {},
                        r"sms\.tsv, line 2: not valid UTF-8 \(byte 0xe9 at column 8\)"),
    "truncated JSON array": ("a.json", b'[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "c", "inp',
                             InstructionData, {}, r"a\.json, line 3: invalid JSON .*truncated"),
    "truncated JSONL line": ("d.jsonl", b'{"dialogue": "x", "summary": "y"}\n{"dialogue": "x", "summ\n',
                             SummarizationData, {}, r"d\.jsonl, line 2: invalid JSON"),
    "empty file": ("empty.jsonl", b"\n \n", SummarizationData, {}, r"empty\.jsonl: file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_names_file_line_and_field(case, tmp_path):
    name, content, loader, kwargs, message = BAD_INPUT[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        loader.load(tmp_path / name, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: no such file"):
        ClassificationData.load(tmp_path / "nope.tsv")


def test_lenient_mode_counts_every_skip(tmp_path, capsys):
    p = tmp_path / "sms.tsv"
    p.write_text("ham\thello\nspam\t \nno tab here\nspam\tWIN\nhma\tyo\n")
    data = ClassificationData.load(p, labels=["ham", "spam"], strict=False)
    assert data.stats.read == 5 and data.stats.kept == 2
    assert data.stats.skipped == {"empty field 'text'": 1, "missing field 'label'": 1, "unknown label": 1}
    assert "read 5, kept 2, skipped 3" in str(data.stats)
    assert capsys.readouterr().out == ""  # loaders return their counts; the caller shows them
