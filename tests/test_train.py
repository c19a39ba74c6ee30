"""Training and evaluation end to end on tiny models and a few dozen records, through the CLI."""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import save_tiny
from lorakit.cli import main


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(5, 120)}" for _ in range(n))


def write_instruct(path, n=40, seed=0):
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        out = _words(rng, 3)
        recs.append({"instruction": "w5 w6", "input": _words(rng, 4), "output": out + " w7 " + out})
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return path


def write_dialogues(path, n=24, refs=1, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        d = _words(rng, 10)
        rec = {"dialogue": d}
        if refs == 1:
            rec["summary"] = " ".join(d.split()[:3])
        else:
            for k in range(1, refs + 1):
                rec[f"summary{k}"] = " ".join(d.split()[: 2 + k])
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines))
    return path


def write_sms(path, n=60, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        spam = i % 3 == 0
        lines.append(("spam\tw100 w101 " if spam else "ham\tw10 w11 ") + _words(rng, 4))
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe(tmp_path, **values):
    f = tmp_path / "recipe.yaml"
    base = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "max_length": 64, "r": 4, "alpha": 8, "dropout": 0.1,
            "eval_every": 3, "seed": 7, "max_new_tokens": 8, "num_samples": 2}
    f.write_text(yaml.safe_dump(base | values))
    return str(f)


@pytest.fixture
def llama_dir(tmp_path):
    return str(save_tiny("llama", tmp_path / "llama"))


def test_instruct_train_eval_generate_merge(tmp_path, llama_dir, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.models.trained import load_adapted
    data = write_instruct(tmp_path / "a.jsonl")
    run = tmp_path / "run"
    r = recipe(tmp_path, model=llama_dir, task="instruct", data=str(data), split=[0.6, 0.2, 0.2], pack=True,
               max_length=160)
    assert main(["train", r, "--out", str(run)]) == 0
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/lorakit.json",
              "run.json", "loss.png"):
        assert (run / f).is_file(), f
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["task"] == "instruct" and info["data"]["train_rows"] < 24  # packed into fewer rows
    # r=4 on q,o (32->32), k,v (32->16), gate,up (32->64), down (64->32), 2 layers: 2 * 4 * 512
    assert info["parameters"]["trainable"] == 2 * 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    losses = [loss for _, loss in info["train_loss"]]
    assert losses[-1] < losses[0]
    assert info["timings"]["tokens"] > 0 and info["versions"]["torch"] == torch.__version__
    capsys.readouterr()

    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["metrics"]) == {"base", "lora"} and ev["test_examples"] == 8
    assert ev["metrics"]["lora"]["loss"] < ev["metrics"]["base"]["loss"]
    html = (run / "report.html").read_text()
    for row in ("base", "lora"):
        assert f"{ev['metrics'][row]['loss']:.4f}" in html and f"{ev['metrics'][row]['loss']:.4f}" in printed
    assert (run / "eval.png").is_file() and len((run / "eval_samples.jsonl").read_text().splitlines()) == 2

    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "w5 w6", "--input", "w9 w10",
                 "--max-new-tokens", "6"]) == 0
    streamed, speed = capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "w5 w6", "--input", "w9 w10",
                 "--max-new-tokens", "6", "--no-stream", "--merge"]) == 0
    assert capsys.readouterr().out.strip() == streamed.strip() != ""  # greedy: merged and streamed agree
    assert "lorakit: 6 tokens in" in speed and "tokens/s)" in speed  # on stderr: stdout is the text alone

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(run / "adapter"), str(merged_dir)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted, _, _ = load_adapted(run / "adapter")
    ids = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert not any("lora" in k for k in plain.state_dict())


def test_classify_run_reports_base_head_only_and_lora(tmp_path, llama_dir, capsys):
    data = write_sms(tmp_path / "sms.tsv")
    run = tmp_path / "run"
    r = recipe(tmp_path, model=llama_dir, task="classify", data=str(data), labels=["ham", "spam"], epochs=4)
    assert main(["train", r, "--out", str(run), "--eval"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["metrics"]) == {"base (untrained head)", "majority class", "head only", "lora"}
    assert ev["labels"] == ["ham", "spam"] and ev["test_examples"] == 12
    lora = ev["metrics"]["lora"]
    assert lora["accuracy"] == 1.0 and sum(map(sum, lora["confusion"])) == 12
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in saved
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["labels"] == ["ham", "spam"]
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "w100 w101 w50"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[0].split()[0] == "spam" and abs(sum(float(x.split()[1]) for x in lines if x) - 1) < 1e-3


def test_seq2seq_summarize_with_rouge(tmp_path):
    t5 = save_tiny("t5", tmp_path / "t5")
    train = write_dialogues(tmp_path / "train.jsonl")
    test = write_dialogues(tmp_path / "test.jsonl", n=6, refs=3, seed=1)
    run = tmp_path / "run"
    r = recipe(tmp_path, model=str(t5), task="summarize", data=str(train), val_data=str(test),
               test_data=str(test), targets=["q", "v"], epochs=3)
    assert main(["train", r, "--out", str(run), "--eval"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["metrics"]["lora"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_f1"}
    g = ev["gains"]["rouge1"]
    assert g["absolute"] == pytest.approx(ev["metrics"]["lora"]["rouge1"] - ev["metrics"]["base"]["rouge1"])
    sample = json.loads((run / "eval_samples.jsonl").read_text().splitlines()[0])
    assert len(sample["references"]) == 3 and {"base", "lora", "dialogue"} <= set(sample)
    assert {"bertscore_f1 base", "bertscore_f1 lora"} <= set(sample)
    assert ev["gains"]["bertscore_f1"]["absolute"] == pytest.approx(
        ev["metrics"]["lora"]["bertscore_f1"] - ev["metrics"]["base"]["bertscore_f1"])


def test_rouge_matches_rouge_score_directly():
    from rouge_score import rouge_scorer

    from lorakit.evaluation.metrics import rouge
    preds = ["the cat sat on the mat", "dogs are running fast"]
    refs = [["a cat was sitting on the mat", "the cat sat"], ["the dog runs quickly"]]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    want = sum(max(scorer.score(r, p)["rouge1"].fmeasure for r in rs) for p, rs in zip(preds, refs)) / 2
    assert rouge(preds, refs)["rouge1"] == pytest.approx(want)
    assert rouge(["running"], [["runs"]])["rouge1"] == 1.0  # stemming


def test_classification_metrics_against_hand_computation():
    from lorakit.evaluation.metrics import classification_metrics
    m = classification_metrics([0, 1, 1, 0, 1], [0, 1, 0, 0, 0], 2)
    assert m["confusion"] == [[2, 2], [0, 1]] and m["accuracy"] == 0.6
    f1_0, f1_1 = 2 * 2 / (2 * 2 + 0 + 2), 2 * 1 / (2 * 1 + 2 + 0)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_reaches_the_uninterrupted_result(tmp_path, llama_dir, monkeypatch, precision):
    import lorakit.training.loop as train_mod
    data = write_instruct(tmp_path / "a.jsonl", n=30)
    common = dict(model=llama_dir, task="instruct", data=str(data), split=[0.8, 0.2, 0.0], epochs=2,
                  checkpoint_every=3, eval_every=2, grad_accum=2, batch_size=3, early_stopping=0, precision=precision)
    straight = tmp_path / "straight"
    assert main(["train", recipe(tmp_path, **common), "--out", str(straight)]) == 0

    real = train_mod.save_checkpoint

    def crash_after_first(out, model, *args):
        real(out, model, *args)
        raise KeyboardInterrupt  # the machine goes away right after the first checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first)
    broken = tmp_path / "broken"
    assert main(["train", recipe(tmp_path, **common), "--out", str(broken)]) == 130
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    assert main(["train", recipe(tmp_path, **common), "--out", str(broken), "--resume"]) == 0
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (straight, broken))
    steps = [s for s, _ in ra["train_loss"]]
    assert steps == [s for s, _ in rb["train_loss"]] == list(range(1, len(steps) + 1)) and len(steps) > 3
    assert [v for _, v in ra["train_loss"]] == pytest.approx([v for _, v in rb["train_loss"]], abs=1e-6)
    assert [v["loss"] for v in ra["metrics"]["val_history"]] == pytest.approx(
        [v["loss"] for v in rb["metrics"]["val_history"]], abs=1e-6)


def test_recipe_errors_name_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model: minilm\n  taks: classify\n")
    assert main(["train", str(bad)]) == 2
    assert "bad.yaml, section model: unknown key 'taks'; did you mean task?" in capsys.readouterr().err
    bad.write_text("train:\n  lr: fast\n")
    assert main(["train", str(bad)]) == 2
    assert "lr = 'fast' is not a valid float" in capsys.readouterr().err
    assert main(["train", "no-such-recipe"]) == 2
    assert "recipe 'no-such-recipe' not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_recipes_listed_and_valid(capsys):
    from lorakit.config.paths import RECIPES
    from lorakit.config.recipes import load_recipe
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("spam", "alpaca", "dialogsum", "gpt2-spam", "gpt2-alpaca", "flan-t5-dialogsum",
                 "llama-3.2-3b-qlora-dialogsum"):
        assert name in out
        load_recipe(RECIPES / f"{name}.yaml")  # every key known, every value of the right type
    spam = load_recipe(RECIPES / "spam.yaml")
    assert spam.model == "minilm" and spam.task == "classify" and spam.data_file(spam.data).is_file()
    assert load_recipe(RECIPES / "gpt2-alpaca.yaml").targets == ["c_attn"]
    qlora = load_recipe(RECIPES / "llama-3.2-3b-qlora-dialogsum.yaml")
    assert (qlora.quantize, qlora.r, qlora.optimizer, qlora.gradient_checkpointing) == ("nf4", 16, "paged_adamw_8bit", True)
    assert qlora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_length_grouped_batches_cover_everything_once_and_pad_less():
    from lorakit.training.loop import epoch_order
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    plain = epoch_order(1000, 16, seed=1, epoch=0)
    grouped = epoch_order(1000, 16, seed=1, epoch=0, lengths=lengths)
    for order in (plain, grouped):
        assert sorted(i for b in order for i in b) == list(range(1000))
    assert grouped == epoch_order(1000, 16, seed=1, epoch=0, lengths=lengths)  # reproducible
    assert grouped != epoch_order(1000, 16, seed=1, epoch=1, lengths=lengths)

    def padded(order):
        return sum(max(lengths[i] for i in b) * len(b) for b in order)
    assert padded(grouped) < 0.7 * padded(plain)


def test_sampling_is_seeded_and_greedy_is_deterministic(tmp_path):
    from conftest import TINY, word_tokenizer
    from lorakit.inference.sampling import Sampling
    from lorakit.inference.generation import generate
    model, tok = TINY["llama"](), word_tokenizer()
    prompts = ["w5 w6 w7", "w9"]
    hot = Sampling(max_new_tokens=8, temperature=1.5, top_p=0.95, top_k=0, seed=3)
    a = generate(model, tok, prompts, hot, batch_size=2)
    assert a == generate(model, tok, prompts, hot, batch_size=2)  # same seed, same text
    assert a != generate(model, tok, prompts, Sampling(8, 1.5, 0.95, 0, seed=4), batch_size=2)
    greedy = generate(model, tok, prompts, Sampling(max_new_tokens=8), batch_size=2)
    assert greedy == generate(model, tok, prompts, Sampling(max_new_tokens=8), batch_size=1)  # left padding is exact
    assert tok.padding_side == "right"


def test_gradient_checkpointing_with_frozen_base_gives_the_same_gradients():
    from conftest import TINY, randomize_lora
    from lorakit import LoRAConfig, add_lora
    grads = []
    for checkpointing in (False, True):
        model = add_lora(TINY["llama"](), LoRAConfig(r=4))
        randomize_lora(model)  # with B = 0, A's gradient is exactly zero
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_early_stopping_keeps_the_best_adapter(tmp_path, llama_dir):
    data = write_instruct(tmp_path / "a.jsonl", n=30)
    run = tmp_path / "run"
    r = recipe(tmp_path, model=llama_dir, task="instruct", data=str(data), split=[0.8, 0.2, 0.0], epochs=30,
               lr=0.3, eval_every=1, early_stopping=2, dropout=0.0, gradient_checkpointing=True)
    assert main(["train", r, "--out", str(run)]) == 0
    info = json.loads((run / "run.json").read_text())
    m = info["metrics"]
    assert m["stopped_early"] and info["timings"]["steps"] < 30 * 6
    vals = [v["loss"] for v in m["val_history"]]
    assert m["best_val_loss"] == min(vals) and vals[-1] > min(vals) and vals[-2] > min(vals)
    from lorakit.models.trained import load_adapted
    from lorakit.data import encode, load_splits
    from lorakit.evaluation import run_config
    from lorakit.training.validation import validate
    cfg = run_config(run)
    model, tok, _ = load_adapted(run / "adapter")
    enc = encode(load_splits(cfg), cfg, tok, seq2seq=False)
    got = validate(model, enc.val, enc.collate, cfg.batch_size, "cpu", __import__("contextlib").nullcontext)
    assert got["loss"] == pytest.approx(m["best_val_loss"], abs=1e-5)  # the saved adapter is the best one


def test_cli_share_prefix_flag_reaches_the_recipe(tmp_path):
    from lorakit.cli import build_parser
    from lorakit.cli.common import overrides as _overrides
    from lorakit.config.recipes import load_recipe
    r = recipe(tmp_path, task="instruct", pack=True)
    parse = build_parser().parse_args
    assert load_recipe(r, _overrides(parse(["train", r]))).share_prefix is True  # the default with pack
    assert load_recipe(r, _overrides(parse(["train", r, "--no-share-prefix"]))).share_prefix is False


@pytest.mark.parametrize("pack", [False, True])
def test_validation_loss_is_the_eval_loss_token_weighted(tmp_path, llama_dir, pack):
    """run.json's best validation loss, `lorakit eval`'s loss on the same file and the token-weighted mean of each
    example's own loss (computed one example at a time) are one number."""
    from lorakit.data.collate import pad_batch
    from lorakit.evaluation.evaluate import run_config
    from lorakit.data import encode_examples, load_splits
    from lorakit.models.trained import load_adapted
    from lorakit.training.validation import validate
    data = write_instruct(tmp_path / "a.jsonl", n=24)
    rng = random.Random(3)
    held = tmp_path / "held.jsonl"  # responses of 1 to 12 words; 11 records: the last batch is short
    held.write_text("\n".join(json.dumps({"instruction": "w5 w6", "input": _words(rng, 4),
                                          "output": _words(rng, rng.randint(1, 12))}) for _ in range(11)))
    run = tmp_path / "run"
    r = recipe(tmp_path, model=llama_dir, task="instruct", data=str(data), val_data=str(held), test_data=str(held),
               epochs=1, eval_every=100, dropout=0.0, pack=pack)
    assert main(["train", r, "--out", str(run)]) == 0
    best = json.loads((run / "run.json").read_text())["metrics"]["best_val_loss"]
    assert main(["eval", str(run), "--no-base"]) == 0
    evaluated = json.loads((run / "eval.json").read_text())["metrics"]["lora"]["loss"]
    assert evaluated == pytest.approx(best, abs=1e-6)

    cfg = run_config(run)
    model, tok, _ = load_adapted(run / "adapter")
    encoded = encode_examples(cfg, load_splits(cfg).test, tok, seq2seq=False)
    lengths = {sum(lab != -100 for lab in e.labels[1:]) for e in encoded}
    assert len(lengths) > 1  # examples of different lengths: a mean of batch means would differ
    total = count = 0.0
    with torch.no_grad():
        for e in encoded:
            batch = pad_batch([e], tok.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + model(**batch).loss.item() * n, count + n
    assert best == pytest.approx(total / count, abs=1e-6)
    got = validate(model, encoded, lambda rows: pad_batch(rows, tok.pad_token_id), 4, "cpu",
                   __import__("contextlib").nullcontext)
    assert got["loss"] == pytest.approx(total / count, abs=1e-6)


def test_loraplus_groups_and_steps_equal_peft_create_loraplus_optimizer():
    """LoRA+ (loraplus_lr_ratio): lorakit's parameter groups train a LoRA model exactly as PEFT's
    create_loraplus_optimizer trains the same PEFT model (same initial A and B, same batches, AdamW)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from conftest import TINY
    from lorakit import LoRAConfig, add_lora
    from lorakit.config.run_config import RunConfig
    from lorakit.training.optim import param_groups
    ours = add_lora(TINY["llama"](), LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    theirs = get_peft_model(TINY["llama"](), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                peft_name = "base_model.model." + name.replace(".lora_A.default", ".lora_A.default.weight").replace(
                    ".lora_B.default", ".lora_B.default.weight")
                theirs.get_parameter(peft_name).copy_(p)
    cfg = RunConfig(lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.0)
    groups = param_groups(ours, cfg, set())
    assert [g["lr"] for g in groups[1:]] == [16e-3] and all(
        any(p is q for q in groups[1]["params"]) == (".lora_B." in n) for n, p in ours.named_parameters() if p.requires_grad)
    opt_ours = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.0)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for name, p in ours.named_parameters():
        if "lora_" in name:
            peft_name = "base_model.model." + name.replace(".lora_A.default", ".lora_A.default.weight").replace(
                ".lora_B.default", ".lora_B.default.weight")
            # Adam divides by sqrt(v): the two backward passes' rounding (~1e-7) shows up to ~1e-5 in the update;
            # a wrong learning rate for A or B moves the weights by ~1e-2
            torch.testing.assert_close(p, theirs.get_parameter(peft_name), atol=1e-5, rtol=0)
    plain = torch.optim.AdamW(param_groups(ours, RunConfig(lr=1e-3), set()), lr=1e-3)
    assert len(plain.param_groups) == 1  # without the ratio: one group at lr


def test_loraplus_ratio_is_recorded_and_bad_values_refused(tmp_path, llama_dir, capsys):
    r = recipe(tmp_path, model=llama_dir, task="instruct", data=str(write_instruct(tmp_path / "a.jsonl", n=12)),
               max_steps=1)
    assert main(["train", r, "--out", str(tmp_path / "run"), "--loraplus-lr-ratio", "16"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["loraplus_lr_ratio"] == 16.0
    assert "LoRA+ B matrices at lr x 16" in capsys.readouterr().out
    for value, words in (("0", "must be > 0"), ("-2", "must be > 0")):
        assert main(["train", r, "--out", str(tmp_path / "x"), "--loraplus-lr-ratio", value]) == 2
        err = capsys.readouterr().err
        assert "loraplus_lr_ratio" in err and words in err and "Traceback" not in err
    assert main(["train", r, "--out", str(tmp_path / "x"), "--method", "full", "--loraplus-lr-ratio", "16"]) == 2
    assert "a full fine-tune has none" in capsys.readouterr().err


def test_eval_on_another_file(tmp_path, llama_dir, capsys):
    """`lorakit eval RUN --data FILE`: the adapter scored on a new file of its task's format, into its own directory,
    its loss the one computed directly; never over another file's evaluation; a label the run never saw refused."""
    from lorakit.evaluation.generative import response_loss
    from lorakit.evaluation.evaluate import run_config
    from lorakit.data import batcher, encode_examples
    from lorakit.models.trained import load_trained
    from lorakit.data.prompts import InstructionData
    run = tmp_path / "run"
    r = recipe(tmp_path, model=llama_dir, task="instruct", data=str(write_instruct(tmp_path / "a.jsonl")),
               max_steps=2, split=[0.6, 0.2, 0.2])
    assert main(["train", r, "--out", str(run)]) == 0
    new = write_instruct(tmp_path / "new.jsonl", n=7, seed=5)
    assert main(["eval", str(run), "--data", str(new), "--no-base"]) == 0
    ev = json.loads((run / "eval-new" / "eval.json").read_text())
    assert ev["test_examples"] == 7 and ev["test_data"] == str(new) and not (run / "eval.json").exists()
    assert (run / "eval-new" / "report.html").is_file()
    cfg = run_config(run)
    model, tok, _ = load_trained(run / "adapter")
    examples = InstructionData.load(new).examples
    direct = response_loss(model, encode_examples(cfg, examples, tok, False), batcher(cfg, tok, False),
                           cfg.batch_size)
    assert ev["metrics"]["lora"]["loss"] == pytest.approx(direct, abs=1e-6)
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_instruct(other / "new.jsonl", n=3, seed=6)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(other / "new.jsonl")]) == 2
    assert "holds the evaluation of another file; pass --out NEW_DIR" in capsys.readouterr().err
    assert json.loads((run / "eval-new" / "eval.json").read_text())["test_examples"] == 7  # untouched


def test_eval_on_another_file_refuses_a_label_the_run_never_saw(tmp_path, llama_dir, capsys):
    run = tmp_path / "run"
    r = recipe(tmp_path, model=llama_dir, task="classify", data=str(write_sms(tmp_path / "sms.tsv")), max_steps=1)
    assert main(["train", r, "--out", str(run)]) == 0
    (tmp_path / "new.tsv").write_text("ham\tw10 w11\nphishing\tw100 w101\n")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "new.tsv")]) == 2
    err = capsys.readouterr().err
    assert "new.tsv, line 2: field 'label': unknown label 'phishing' (known: ham, spam)" in err


def test_data_command_on_a_classifier_and_alpaca(tmp_path, llama_dir, capsys):
    r = recipe(tmp_path, model=llama_dir, task="classify", data=str(write_sms(tmp_path / "sms.tsv")))
    assert main(["data", r, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "read 60, kept 60, skipped 0" in out and "a classifier trains on the label" in out
    assert "[[\n→ label ham]]" in out or "[[\n→ label spam]]" in out
    r = recipe(tmp_path, model=llama_dir, task="instruct", data=str(write_instruct(tmp_path / "a.jsonl")))
    assert main(["data", r, "--show", "2", "--json"]) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(objects) == 2 and all(o["text"].endswith(o["trained"][-1]) for o in objects)  # the response + EOS
    assert all(o["trained"][-1].endswith("</s>") and 0 < o["trained_tokens"] < o["tokens"] for o in objects)
