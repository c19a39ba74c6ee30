"""Preference tuning against TRL 1.16 (the oracle): DPO's losses, ORPO and SimPO on the same token ids and LoRA
weights give TRL's loss, metrics and LoRA gradients; a run that starts from a trained adapter uses it as the
reference, as TRL does for a trained PeftModel; three optimizer steps of `lorakit train` reach TRL's adapter. The
packed pair row (the prompt once) gives what two separate padded rows give. The data forms, their errors, and the
real HH-RLHF file."""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA, randomize_lora, save_tiny, tiny_gpt2, tiny_llama, word_tokenizer
from lorakit import LoRAConfig, add_lora
from lorakit.cli import main
from lorakit.data.examples import IGNORE, EncodedExample
from lorakit.data.preferences import EncodedPair, PreferenceData, encode_pairs, pair_batch
from lorakit.errors import DataError
from lorakit.training.preference import preference_objective, sequence_logps

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Cfg:
    def __init__(self, loss="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5):
        self.loss, self.beta, self.label_smoothing, self.simpo_gamma = loss, beta, label_smoothing, simpo_gamma


def random_pairs(seed: int = 3, vocab: int = 120) -> list[EncodedPair]:
    """Pairs of token ids (every reply token labelled), prompts and replies of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    shapes = [(7, 4, 6), (3, 9, 2), (5, 5, 5), (8, 2, 7)]
    return [EncodedPair(ids(p), EncodedExample(c := ids(nc), c), EncodedExample(r := ids(nr), r))
            for p, nc, nr in shapes]


def peft_key(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".default.weight", ".default")


def ours_from_peft(base, peft_model, adapter="default"):
    """A lorakit model with the PEFT model's LoRA weights (same targets, rank and alpha)."""
    ours = copy.deepcopy(base)
    add_lora(ours, LoRAConfig(r=4, alpha=8, targets=TARGETS), adapter)
    state = {peft_key(n).replace(".default", f".{adapter}"): p.detach() for n, p in peft_model.named_parameters()
             if "lora_" in n and ".default." in n}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n in state:
                p.copy_(state[n])
    assert sum(n in state for n, _ in ours.named_parameters()) == len(state) > 0
    return ours


def randomize_b(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def trl_args(config_cls, **extra):
    settings = dict(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, fp16=False,
                    per_device_train_batch_size=4, max_steps=1, logging_steps=1, gradient_checkpointing=False,
                    save_strategy="no", max_length=64)
    return config_cls(**(settings | extra))


def lora_config():
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def dummy_dataset(n=4):
    from datasets import Dataset
    return Dataset.from_dict({"prompt": ["w5 w6"] * n, "chosen": [" w7"] * n, "rejected": [" w8"] * n})


def compare(trl_loss, trl_metrics, trl_model, ours, loss, metrics, keys, atol=1e-5):
    assert loss.item() == pytest.approx(trl_loss.item(), abs=atol)
    for k in keys:
        assert metrics[k] == pytest.approx(trl_metrics[k], abs=atol), k
    trl_grads = {peft_key(n): p.grad for n, p in trl_model.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(trl_grads) and len(ours_grads) == 16
    for n, g in ours_grads.items():
        torch.testing.assert_close(g, trl_grads[n], atol=atol, rtol=0)
    assert any(g.abs().max() > 1e-4 for g in ours_grads.values())  # gradients that test something


DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0),
                                             ("robust", 0.2)])
def test_dpo_losses_equal_trl_dpo_trainer(loss, smoothing):
    """First step of TRL's DPOTrainer with a PEFT model and ref_model=None (the reference: adapters disabled), on the
    same token ids and LoRA weights: the same loss, metrics and LoRA gradients."""
    from trl import DPOConfig, DPOTrainer
    pairs, base = random_pairs(), tiny_llama()
    trainer = DPOTrainer(model=copy.deepcopy(base), train_dataset=dummy_dataset(), processing_class=word_tokenizer(),
                         peft_config=lora_config(), args=trl_args(DPOConfig, beta=0.1, loss_type=[loss],
                                                                  label_smoothing=smoothing))
    randomize_b(trainer.model)
    batch = trainer.data_collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen.input_ids,
                                    "rejected_ids": p.rejected.input_ids} for p in pairs])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ours = ours_from_peft(base, trainer.model).train()
    loss_value, metrics = preference_objective(Cfg(loss, 0.1, smoothing), None)(ours, pair_batch(pairs, pad_id=0))
    loss_value.backward()
    compare(trl_loss, trl_metrics, trainer.model, ours, loss_value, metrics, DPO_KEYS)


def test_cdpo_label_smoothing_is_the_formula():
    """TRL 1.16's sigmoid loss ignores label_smoothing (its cDPO is gone); lorakit keeps cDPO (Mitchell, 2023):
    -(1-e)·logσ(βΔ) - e·logσ(-βΔ), checked against the formula on the same log-probabilities."""
    pairs, model = random_pairs(), tiny_llama()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=TARGETS))
    randomize_b(model)
    batch = pair_batch(pairs, pad_id=0)
    loss, _ = preference_objective(Cfg("sigmoid", 0.3, 0.25), None)(model, batch)
    batch = dict(batch)
    segments = batch.pop("segments")
    policy, _ = sequence_logps(model, batch, segments)
    from lorakit import disable_adapters
    with torch.no_grad(), disable_adapters(model):
        reference, _ = sequence_logps(model, batch, segments)
    delta = 0.3 * ((policy - reference)[:, 0] - (policy - reference)[:, 1])
    expected = (-(0.75) * F.logsigmoid(delta) - 0.25 * F.logsigmoid(-delta)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def orpo_rows(pairs):
    """TRL ORPO / CPO's tokenised rows for our token ids: prompt + reply, the prompt's labels -100."""
    rows = []
    for p in pairs:
        row = {"prompt_input_ids": p.prompt_ids, "prompt_attention_mask": [1] * len(p.prompt_ids)}
        for side, reply in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids = p.prompt_ids + reply.input_ids
            row |= {f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [IGNORE] * len(p.prompt_ids) + reply.input_ids}
        rows.append(row)
    return rows


def test_simpo_equals_trl_cpo_trainer_with_simpo_and_no_nll():
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    pairs, base = random_pairs(), tiny_llama()
    trainer = CPOTrainer(model=copy.deepcopy(base), train_dataset=dummy_dataset(), processing_class=word_tokenizer(),
                         peft_config=lora_config(), args=trl_args(CPOConfig, beta=2.0, loss_type="simpo", cpo_alpha=0.0,
                                                                  simpo_gamma=0.7))
    randomize_b(trainer.model)
    trainer.model.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(orpo_rows(pairs)),
                                                           "train")
    trl_loss.backward()
    trl_metrics = {k: float(v) for k, v in trl_metrics.items()}
    ours = ours_from_peft(base, trainer.model).train()
    loss, metrics = preference_objective(Cfg("simpo", 2.0, simpo_gamma=0.7), None)(ours, pair_batch(pairs, pad_id=0))
    loss.backward()
    compare(trl_loss, trl_metrics, trainer.model, ours, loss, metrics, DPO_KEYS)


def test_orpo_odds_ratio_equals_trl_orpo_trainer_and_its_nll_is_the_reply_tokens():
    """ORPO: the rewards, mean log-probabilities and log-odds terms equal TRL's ORPOTrainer. TRL's NLL term is a
    token mean over the whole chosen sequence, prompt included; lorakit's is over the chosen reply's tokens (the
    supervised loss on the response, as ORPO's paper and LLaMA-Factory have it): checked against that formula, and
    the loss as NLL - β·log_odds_ratio."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    pairs, base = random_pairs(), tiny_llama()
    tok = word_tokenizer()
    trainer = ORPOTrainer(model=copy.deepcopy(base), train_dataset=dummy_dataset(), processing_class=tok,
                          peft_config=lora_config(), args=trl_args(ORPOConfig, beta=0.25))
    randomize_b(trainer.model)
    trainer.model.train()
    _, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(orpo_rows(pairs)), "train")
    trl_metrics = {k: float(v) for k, v in trl_metrics.items()}
    ours = ours_from_peft(base, trainer.model).train()
    loss, metrics = preference_objective(Cfg("orpo", 0.25), None)(ours, pair_batch(pairs, pad_id=0))
    for k in DPO_KEYS + ("log_odds_ratio", "log_odds_chosen"):
        assert metrics[k] == pytest.approx(trl_metrics[k], abs=1e-5), k
    with torch.no_grad():  # the formula: mean cross-entropy over the chosen replies' tokens, row by row
        nll = sum(-F.log_softmax(ours(input_ids=torch.tensor([p.prompt_ids + p.chosen.input_ids])).logits[0], -1)
                  [len(p.prompt_ids) - 1:-1].gather(1, torch.tensor(p.chosen.input_ids)[:, None]).sum()
                  for p in pairs) / sum(len(p.chosen.input_ids) for p in pairs)
    assert metrics["nll_loss"] == pytest.approx(nll.item(), abs=1e-5)
    assert trl_metrics["nll_loss"] != pytest.approx(nll.item(), abs=1e-3)  # TRL's also counts the prompt's tokens
    assert loss.item() == pytest.approx(metrics["nll_loss"] - 0.25 * metrics["log_odds_ratio"], abs=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
def test_one_packed_row_per_pair_equals_two_padded_rows(make, loss):
    """The pair's replies attending to one copy of the prompt in one row: the loss and every LoRA gradient of
    separate padded rows (prompt + reply each), whose log-probabilities come from the model's full logits."""
    pairs = random_pairs()
    model = make()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_b(model)
    model.eval()  # GPT-2's dropout off: both sides compute the same function (LoRA still gets gradients)
    loss_packed, metrics = preference_objective(Cfg(loss), None)(model, pair_batch(pairs, pad_id=0))
    loss_packed.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    def row_logps(prompt, reply):  # a plain padded-free row: prompt + reply, summed reply log-probabilities
        ids = torch.tensor([prompt + reply])
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        return logp[len(prompt) - 1:].gather(1, torch.tensor(reply)[:, None]).sum()

    policy = torch.stack([torch.stack([row_logps(p.prompt_ids, r.input_ids) for r in (p.chosen, p.rejected)])
                          for p in pairs])
    counts = torch.tensor([[len(p.chosen.input_ids), len(p.rejected.input_ids)] for p in pairs], dtype=torch.float)
    from lorakit import disable_adapters
    from lorakit.training.preference import dpo_family_loss, orpo_loss
    if loss == "orpo":
        expected, _ = orpo_loss(policy, counts, 0.1)
    else:
        with torch.no_grad(), disable_adapters(model):
            reference = torch.stack([torch.stack([row_logps(p.prompt_ids, r.input_ids) for r in (p.chosen, p.rejected)])
                                     for p in pairs])
        expected, _ = dpo_family_loss("sigmoid", policy, reference, counts, 0.1, 0.0)
    expected.backward()
    assert loss_packed.item() == pytest.approx(expected.item(), abs=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(packed[n], p.grad, atol=1e-5, rtol=0)
    row = pair_batch(pairs[:1], pad_id=0)["input_ids"]
    p = pairs[0]
    assert row.shape[1] == len(p.prompt_ids) + len(p.chosen.input_ids) + len(p.rejected.input_ids) + 1  # not 2x prompt


def write_pairs(path, n=24, seed=0):
    import random
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(10, 120)}" for _ in range(k))  # noqa: E731
    path.write_text("\n".join(json.dumps({"prompt": words(5), "chosen": "w7 " + words(3), "rejected": "w9 " + words(3)})
                              for _ in range(n)) + "\n")
    return path


def recipe_file(tmp_path, **values):
    import yaml
    base = {"task": "preference", "batch_size": 4, "lr": 1e-2, "max_length": 64, "seed": 7, "max_new_tokens": 4,
            "num_samples": 2, "schedule": "constant", "warmup": 0.0, "max_grad_norm": 0.0, "dropout": 0.0}
    f = tmp_path / "pref.yaml"
    f.write_text(yaml.safe_dump(base | values))
    return str(f)


def test_three_steps_from_a_trained_adapter_reach_trl_adapter(tmp_path):
    """`lorakit train` from an adapter (init_adapter: the reference is that adapter, frozen) and TRL's DPOTrainer
    given the same adapter as a PeftModel (TRL then keeps a frozen "ref" copy of it), the same token ids, learning
    rate, AdamW and batch: after three optimizer steps the adapters are equal."""
    from peft import PeftModel, get_peft_model
    from trl import DPOConfig, DPOTrainer
    llama = save_tiny("llama", tmp_path / "llama")
    start = get_peft_model(tiny_llama(), lora_config())
    randomize_b(start, seed=9)
    start.save_pretrained(tmp_path / "start")
    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    r = recipe_file(tmp_path, model=str(llama), data=str(data), split=[1.0, 0.0, 0.0], batch_size=8, max_steps=3,
                    init_adapter=str(tmp_path / "start"), lr=5e-3, beta=0.5)
    assert main(["train", r, "--out", str(tmp_path / "run")]) == 0
    from lorakit.config import load_recipe
    from lorakit.data import load_splits
    cfg = load_recipe(r)
    encoded = encode_pairs(load_splits(cfg).train, word_tokenizer(), cfg.max_length, cfg.template)
    from datasets import Dataset
    peft_start = PeftModel.from_pretrained(tiny_llama(), tmp_path / "start", is_trainable=True)
    trainer = DPOTrainer(model=peft_start, train_dataset=dummy_dataset(8), processing_class=word_tokenizer(),
                         args=trl_args(DPOConfig, beta=0.5, learning_rate=5e-3, lr_scheduler_type="constant",
                                       warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, max_steps=3,
                                       per_device_train_batch_size=8, optim="adamw_torch"))
    trainer.train_dataset = Dataset.from_dict({"prompt_ids": [p.prompt_ids for p in encoded],
                                               "chosen_ids": [trained(p.chosen) for p in encoded],
                                               "rejected_ids": [trained(p.rejected) for p in encoded]})
    trainer.train()
    from safetensors.torch import load_file
    ours = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    theirs = {n.replace(".default", ""): p.detach() for n, p in trainer.model.named_parameters() if ".default." in n}
    assert set(ours) == set(theirs) and len(ours) == 16
    moved = 0.0
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], atol=1e-5, rtol=0)
        moved = max(moved, (v - load_file(tmp_path / "start" / "adapter_model.safetensors")[k]).abs().max().item())
    assert moved > 1e-3


def trained(reply: EncodedExample) -> list[int]:
    """A reply's tokens up to its last trained one (TRL scores every completion token: the untrained tail, the
    newline after the end-of-turn token, is left off for it)."""
    last = max(i for i, lab in enumerate(reply.labels) if lab != IGNORE)
    assert all(lab != IGNORE for lab in reply.labels[:last + 1])
    return reply.input_ids[:last + 1]


# ------------------------------------------------------------------------------------------------ data

def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_every_form_gives_the_same_pair(tmp_path):
    user, good, bad = "How do I boil an egg?", "Simmer it for nine minutes.", "Drop it on the floor."
    records = [
        {"prompt": user, "chosen": good, "rejected": bad},
        {"prompt": [{"role": "user", "content": user}], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},
        {"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": good}],
         "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": bad}]},
        {"chosen": f"\n\nHuman: {user}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {user}\n\nAssistant: {bad}"},
        {"instruction": user, "input": "", "chosen": good, "rejected": bad},
    ]
    data = PreferenceData.load(write_jsonl(tmp_path / "p.jsonl", records))
    assert all((p.prompt[0].content, p.chosen, p.rejected) == (user, good, bad) and len(p.prompt) == 1
               for p in data.pairs)
    assert {k: v for k, v in data.stats.notes.items() if k.startswith("format")} == {
        f"format {f}": 1 for f in ("explicit", "messages", "implicit", "hh", "ranking")}
    ranked = PreferenceData.load(write_jsonl(tmp_path / "r.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "chosen": "5", "rejected": "6", "system": "Be brief.",
         "history": [["Hi", "Hello!"]]}])).pairs[0]
    assert [(m.role, m.content) for m in ranked.prompt] == [("system", "Be brief."), ("user", "Hi"),
                                                             ("assistant", "Hello!"), ("user", "Add\n2 and 3")]


@pytest.mark.parametrize("record, message, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the two replies are the same text", "identical replies"),
    ({"prompt": "q", "chosen": "  ", "rejected": "no"}, "field 'chosen': the reply is empty", "empty chosen reply"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: b\n\nAssistant: no"},
     "differ before their last turn", "prompts differ"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "a"}]},
     "must end with the assistant's reply", "last turn not the assistant's"),
    ({"prompt": "q", "chosen": "yes"}, "missing field 'rejected'", "missing field 'rejected'"),
    ({"question": "q"}, "missing field 'chosen'", "missing field 'chosen'"),
])
def test_bad_pairs_name_file_record_and_field_or_are_counted(tmp_path, record, message, reason):
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    f = write_jsonl(tmp_path / "p.jsonl", [good, record])
    with pytest.raises(DataError, match="line 2") as e:
        PreferenceData.load(f)
    assert message in str(e.value) and "skip_invalid" in str(e.value)
    data = PreferenceData.load(f, strict=False)
    assert len(data.pairs) == 1 and data.stats.skipped == {reason: 1}


def test_the_hh_rlhf_file_with_its_mess_counted():
    path = DATA / "hh_rlhf" / "harmless-base-test.jsonl"
    if not path.is_file():
        pytest.skip("no ../shared/data/hh_rlhf")
    data = PreferenceData.load(path, strict=False)
    assert data.stats.read == 2012 and data.stats.skipped == {"prompts differ": 5, "empty chosen reply": 3}
    assert len(data.pairs) == 2004 and data.stats.notes["format hh"] == 2004
    multi = [p for p in data.pairs if len(p.prompt) >= 5]
    assert multi and all(p.prompt[-1].role == "user" for p in data.pairs)
    with pytest.raises(DataError, match=r"harmless-base-test.jsonl, line \d+: .*(differ|empty)"):
        PreferenceData.load(path)


@pytest.fixture(scope="module")
def smol_tok():
    from lorakit.models.loading import load_tokenizer, resolve_spec
    return load_tokenizer(resolve_spec("smollm2")[0])


@pytest.mark.slow
def test_encoding_in_the_chat_template_prompt_once_replies_with_their_end_of_turn(smol_tok):
    from lorakit.data.conversations import Message
    from lorakit.data.preferences import PreferencePair
    from lorakit.data.readers import LoadStats
    pair = PreferencePair([Message("user", "Name a colour.")], "Blue.", "I will not.")
    stats = LoadStats("encode")
    enc = encode_pairs([pair], smol_tok, 128, "chat", stats)[0]
    text = smol_tok.decode(enc.prompt_ids)
    assert text.endswith("<|im_start|>assistant\n") and "Name a colour." in text
    for reply, want in ((enc.chosen, "Blue.<|im_end|>"), (enc.rejected, "I will not.<|im_end|>")):
        assert smol_tok.decode([t for t in reply.labels if t != IGNORE]) == want
    # too long: the oldest exchange goes, the replies stay; the last exchange alone too long cuts the reply
    long_prompt = [Message("user", "old " * 40), Message("assistant", "ok " * 40), Message("user", "Name a colour.")]
    fitted = encode_pairs([PreferencePair(long_prompt, "Blue.", "No.")], smol_tok, 48, "chat", stats)[0]
    assert "old" not in smol_tok.decode(fitted.prompt_ids) and "Name a colour." in smol_tok.decode(fitted.prompt_ids)
    cut = encode_pairs([PreferencePair([Message("user", "Hi")], "word " * 80, "No.")], smol_tok, 40, "chat", stats)[0]
    assert len(cut.prompt_ids) + len(cut.chosen.input_ids) == 40
    assert stats.notes["prompt shortened: oldest exchanges dropped to fit max_length"] == 1
    assert stats.notes["reply cut to fit max_length (its last exchange alone is longer)"] == 1


def test_preference_run_end_to_end(tmp_path, capsys):
    """Train (metrics as TRL names them, each step), evaluate (pair accuracy base vs adapted with its standard
    error, replies side by side), show a pair with `lorakit data`; precomputed reference values kept and read back."""
    llama = save_tiny("llama", tmp_path / "llama")
    r = recipe_file(tmp_path, model=str(llama), data=str(write_pairs(tmp_path / "p.jsonl", n=30)),
                    split=[0.6, 0.2, 0.2], max_steps=4, eval_every=2, precompute_reference=True)
    run = tmp_path / "run"
    assert main(["train", r, "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(records[0])
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    assert "eval_rewards/accuracies" in records[1]
    assert (run / "reference_logps.safetensors").is_file()
    capsys.readouterr()
    assert main(["train", r, "--out", str(run), "--overwrite"]) == 0
    assert "reference log-probabilities read from" in capsys.readouterr().out
    assert main(["eval", str(run)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["metrics"]) == {"base", "lora"} and ev["primary"] == "pair_accuracy"
    assert 0 <= ev["metrics"]["lora"]["pair_accuracy"] <= 1 and ev["metrics"]["base"]["pair_accuracy_se"] > 0
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "chosen", "rejected", "base", "lora"} <= set(samples[0])
    assert "pair_accuracy" in (run / "report.html").read_text()
    capsys.readouterr()
    assert main(["data", r, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "[chosen] [[" in out and "[rejected] {{" in out and "format explicit: 30" in out


def test_precomputed_reference_gives_the_same_loss(tmp_path):
    llama = save_tiny("llama", tmp_path / "llama")
    data = write_pairs(tmp_path / "p.jsonl", n=12)
    losses = {}
    for pre in (False, True):
        r = recipe_file(tmp_path, model=str(llama), data=str(data), split=[1.0, 0.0, 0.0], max_steps=3,
                        precompute_reference=pre)
        assert main(["train", r, "--out", str(tmp_path / f"run{pre}")]) == 0
        losses[pre] = [json.loads(line)["loss"] for line in (tmp_path / f"run{pre}" / "metrics.jsonl").read_text().splitlines()]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


@pytest.mark.parametrize("values, words", [
    ({"task": "chat", "beta": 0.2}, "apply to task preference only"),
    ({"loss": "kto"}, "loss 'kto' must be sigmoid, ipo, hinge, robust, orpo or simpo"),
    ({"loss": "hinge", "label_smoothing": 0.1}, "label_smoothing applies to losses sigmoid"),
    ({"loss": "orpo", "precompute_reference": True}, "uses no reference model"),
    ({"method": "full"}, "method lora or qlora"),
    ({"pack": True}, "leave pack out"),
])
def test_preference_settings_that_cannot_apply_are_refused(tmp_path, capsys, values, words):
    r = recipe_file(tmp_path, data="p.jsonl", **values)
    assert main(["train", r]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_the_page_serves_a_preference_run_as_a_chat_and_eval_takes_another_file(tmp_path):
    llama = save_tiny("llama", tmp_path / "llama")
    r = recipe_file(tmp_path, model=str(llama), data=str(write_pairs(tmp_path / "p.jsonl", n=16)),
                    split=[0.75, 0.0, 0.25], max_steps=2)
    run = tmp_path / "run"
    assert main(["train", r, "--out", str(run)]) == 0
    from lorakit.serve import Workbench
    wb = Workbench(None, [str(run)])
    assert wb.task == "chat" and list(wb.adapters) == ["run"]
    other = write_pairs(tmp_path / "other.jsonl", n=5, seed=4)
    assert main(["eval", str(run), "--data", str(other), "--no-base"]) == 0
    ev = json.loads((run / "eval-other" / "eval.json").read_text())
    assert ev["test_examples"] == 5 and set(ev["metrics"]) == {"lora"}


def test_the_reference_pass_runs_without_dropout_or_gradients_and_restores_the_mode():
    """GPT-2 (dropout 0.1 in its config) in training mode: the reference log-probabilities are the base's in eval mode,
    the same on every call, and training mode is back afterwards."""
    from lorakit.training.preference import as_reference
    pairs, model = random_pairs(), tiny_gpt2()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear", dropout=0.5))
    randomize_b(model)
    model.train()
    batch = dict(pair_batch(pairs, pad_id=0))
    segments = batch.pop("segments")
    with as_reference(model, None):
        assert not model.training and not torch.is_grad_enabled()
        first, _ = sequence_logps(model, batch, segments)
        second, _ = sequence_logps(model, batch, segments)
    assert model.training and torch.equal(first, second)
    from lorakit import disable_adapters
    with torch.no_grad(), disable_adapters(model):
        model.eval()
        expected, _ = sequence_logps(model, batch, segments)
    torch.testing.assert_close(first, expected, atol=0, rtol=0)


def test_the_kept_reference_values_follow_the_reference_adapters_weights(tmp_path):
    """An adapter trained again in place is another reference: the key of the kept values changes with its weights."""
    from types import SimpleNamespace

    from lorakit import save_adapter
    from lorakit.training.reference import reference_key
    model = tiny_llama()
    add_lora(model, LoRAConfig(r=2, alpha=4, targets="all-linear"))
    save_adapter(model, tmp_path / "start")
    run = SimpleNamespace(cfg=SimpleNamespace(model="tiny", quantize="", init_adapter=str(tmp_path / "start")),
                          reference="start", data=SimpleNamespace(train=[], val=[]))
    before = reference_key(run)
    assert reference_key(run) == before
    randomize_lora(model, seed=3)
    save_adapter(model, tmp_path / "start")
    assert reference_key(run) != before
