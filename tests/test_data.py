"""Data formats: the real files, splits, label masks, truncation, packing and every bad-input case."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import DATA, TINY
from lorakit.collate import pack, packed_batch, pad_batch, seq2seq_batch
from lorakit.data import (IGNORE, ClassificationData, DataError, EncodedExample, InstructionData, SummarizationData,
                          balance)

SMS = DATA / "sms_spam_collection" / "SMSSpamCollection"
ALPACA = DATA / "alpaca" / "alpaca_data.json"
DIALOGSUM = DATA / "dialogsum"


@pytest.fixture(scope="module")
def smol_tok():
    from lorakit.models import load_tokenizer, resolve_spec
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
    assert "read 5, kept 2, skipped 3" in capsys.readouterr().out
