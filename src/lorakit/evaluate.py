"""Evaluation, always base versus adapted on the same test examples.

classify   accuracy, macro-F1, confusion matrix: base (its new head is untrained: chance), a head-only baseline
           (the head trained on frozen base features), and the adapted model
summarize  ROUGE-1/2/L/Lsum (rouge-score, stemmed, best over all references) and BERTScore F1 (bertscore.py),
           absolute and relative gains
instruct   mean loss and perplexity on held-out responses, plus sample generations with their BERTScore F1
chat       the same on held-out conversations: loss on their assistant turns, and replies to each one's last user
           turn (the history before it as context) scored against the conversation's own reply
Writes eval.json, report.html (see report.py) and the generations as JSONL into the run directory. The trained
row is named by the run's method (lora, qlora or full); for a full fine-tune the base is a separately loaded copy.
with_base=False leaves the base rows out (`lorakit compare` computes them once for all methods).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from .bertscore import SETUP, bertscore_f1
from .config import RunConfig, validate
from .conversations import heldout_reply
from .data import IGNORE, format_prompt
from .generate import Sampling, generate, generate_base_and_adapted
from .errors import UserError
from .inject import disable_adapters
from .loss import heldout_loss_sum
from .models import head_name, is_seq2seq, load_model
from .tasks import Splits, collate_for, data_path, encode_prompts, examples_of, load_file, load_splits
from .trained import load_trained

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def classification_metrics(pred: list[int], gold: list[int], n_labels: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted)."""
    cm = [[0] * n_labels for _ in range(n_labels)]
    for p, g in zip(pred, gold):
        cm[g][p] += 1
    f1s = []
    for k in range(n_labels):
        tp = cm[k][k]
        fp = sum(cm[g][k] for g in range(n_labels)) - tp
        fn = sum(cm[k]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1),
            "macro_f1": sum(f1s) / n_labels, "confusion": cm}


@torch.no_grad()
def _classify(model, tok, examples, cfg, features: bool = False):
    """Predicted labels; with features=True, also the pooled vectors the head reads (for the head-only baseline)."""
    collate = collate_for(cfg, tok, model)
    model.eval()
    head = model.get_submodule(head_name(model))
    grabbed: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: grabbed.append(inp[0])) if features else None
    preds, feats = [], []
    for i in range(0, len(examples), cfg.batch_size * 2):
        batch = collate(examples[i:i + cfg.batch_size * 2])
        batch.pop("labels")
        preds += model(**batch).logits.argmax(-1).tolist()
        if features:
            x = grabbed.pop()
            if x.dim() == 3:  # decoder classifiers pool at the last non-pad token, as transformers does
                ids = batch["input_ids"]
                last = (torch.arange(ids.shape[1]) * (ids != model.config.pad_token_id)).argmax(-1)
                x = x[torch.arange(x.shape[0]), last]
            feats.append(x)
    if hook:
        hook.remove()
    return preds, (torch.cat(feats) if features else None)


def head_only_baseline(base, tok, train, test, cfg, epochs: int = 60) -> list[int]:
    """Train only a fresh head on frozen base features (cached once): the fair baseline for a LoRA classifier."""
    _, train_x = _classify(base, tok, train, cfg, features=True)
    _, test_x = _classify(base, tok, test, cfg, features=True)
    y = torch.tensor([e.label for e in train])
    head = base.get_submodule(head_name(base))
    torch.manual_seed(cfg.seed)
    layer = torch.nn.Linear(train_x.shape[1], head.out_features, bias=head.bias is not None)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(layer(train_x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        return layer(test_x).argmax(-1).tolist()


def eval_classify(model, tok, splits, cfg, tuned: str = "lora", with_base: bool = True) -> dict:
    gold = [e.label for e in splits.test]
    n = len(splits.labels)
    adapted, _ = _classify(model, tok, splits.test, cfg)
    samples = [{"text": e.text, "label": splits.labels[e.label]} for e in splits.test]
    rows = {}
    if with_base:
        torch.manual_seed(cfg.seed)
        base, _ = load_model(cfg.model, "classify", num_labels=n)
        base_pred, _ = _classify(base, tok, splits.test, cfg)
        head_pred = head_only_baseline(base, tok, splits.train, splits.test, cfg)
        majority = max(range(n), key=lambda k: sum(1 for e in splits.train if e.label == k))
        rows = {"base (untrained head)": classification_metrics(base_pred, gold, n),
                "majority class": classification_metrics([majority] * len(gold), gold, n),
                "head only": classification_metrics(head_pred, gold, n)}
        for s, b, h in zip(samples, base_pred, head_pred):
            s.update(base=splits.labels[b], head_only=splits.labels[h])
    rows[tuned] = classification_metrics(adapted, gold, n)
    for s, a in zip(samples, adapted):
        s[tuned] = splits.labels[a]
    return {"metrics": rows, "primary": "accuracy", "labels": splits.labels, "samples": samples}


def rouge(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE F1 (stemmed), best over each example's references; rougeLsum splits sentences on newlines."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, pred)
        for k in ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    return {k: v / max(len(predictions), 1) for k, v in totals.items()}


def _prompts(model, tok, examples, cfg) -> list[str]:
    if is_seq2seq(model):
        return [e.prompt_input for e in examples]
    return [format_prompt(tok, e.instruction, e.prompt_input, cfg.template) for e in examples]


def _base_and_tuned(model, base_model, tok, prompts, sampling, cfg, with_base: bool, progress: bool = False):
    """(base completions or None, tuned completions): the base from `base_model`, or the model with LoRA off."""
    if base_model is None and with_base:
        return generate_base_and_adapted(model, tok, prompts, sampling, cfg.template, progress=progress)
    tuned = generate(model, tok, prompts, sampling, cfg.template, progress="tuned" if progress else None)
    if not with_base:
        return None, tuned
    return generate(base_model, tok, prompts, sampling, cfg.template, progress="base" if progress else None), tuned


def eval_summarize(model, tok, splits, cfg, tuned: str = "lora", with_base: bool = True, base_model=None) -> dict:
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens)
    prompts = _prompts(model, tok, splits.test, cfg)
    base, adapted = _base_and_tuned(model, base_model, tok, prompts, sampling, cfg, with_base, progress=True)
    refs = [e.references for e in splits.test]
    generations = ({"base": base} if with_base else {}) | {tuned: adapted}
    bertscores, samples = scored_samples([{"dialogue": e.prompt_input, "references": e.references}
                                          for e in splits.test], generations, refs)
    rows = {name: rouge(texts, refs) | {"bertscore_f1": bertscores[name]} for name, texts in generations.items()}
    gains = {k: {"absolute": rows[tuned][k] - rows["base"][k],
                 "relative": (rows[tuned][k] - rows["base"][k]) / rows["base"][k] if rows["base"][k] else None}
             for k in rows[tuned]} if with_base else {}
    return {"metrics": rows, "gains": gains, "primary": "rouge1", "bertscore": SETUP, "samples": samples}


def scored_samples(records: list[dict], generations: dict[str, list[str]], refs: list[list[str]]
                   ) -> tuple[dict[str, float], list[dict]]:
    """({row: mean BERTScore F1}, the samples): each record with every row's generation and its BERTScore F1."""
    per_example = {name: bertscore_f1(texts, refs) for name, texts in generations.items()}
    samples = [record | {name: texts[i] for name, texts in generations.items()}
               | {f"bertscore_f1 {name}": scores[i] for name, scores in per_example.items()}
               for i, record in enumerate(records)]
    return {name: sum(scores) / max(len(scores), 1) for name, scores in per_example.items()}, samples


@torch.no_grad()
def response_loss(model, examples, collate, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the response tokens of `examples` (the same loss as validation)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        summed, n, _ = heldout_loss_sum(model, collate(examples[i:i + batch_size]), is_seq2seq(model))
        total, count = total + summed, count + n
    return total / max(count, 1)


def _reply_samples(tok, examples, cfg) -> tuple[list[str], list[dict], list[str]]:
    """(prompts, sample records, references) for scoring sample replies: instructions, or conversations' last turns."""
    if cfg.task == "chat":
        held = [heldout_reply(tok, conv, cfg.template, cfg.max_length) for conv in examples]
        return ([prompt for prompt, _, _ in held],
                [{"conversation": [f"{m['role']}: {m['content']}" for m in history], "reference": ref}
                 for _, history, ref in held], [ref for _, _, ref in held])
    return ([format_prompt(tok, e.instruction, e.prompt_input, cfg.template) for e in examples],
            [{"instruction": e.instruction, "input": e.prompt_input, "reference": e.response} for e in examples],
            [e.response for e in examples])


def eval_instruct(model, tok, splits, cfg, tuned: str = "lora", with_base: bool = True, base_model=None) -> dict:
    """Instruction tuning and chat: held-out loss base vs tuned, and sample replies with their BERTScore F1."""
    encoded = encode_prompts(cfg, splits.test, tok, model)
    collate = collate_for(cfg, tok, model)
    losses = {}
    if with_base:
        with disable_adapters(model) if base_model is None else contextlib.nullcontext():
            losses["base"] = response_loss(base_model or model, encoded, collate, cfg.batch_size)
    losses[tuned] = response_loss(model, encoded, collate, cfg.batch_size)
    rows = {name: {"loss": v, "perplexity": math.exp(min(v, 50))} for name, v in losses.items()}
    prompts, records, references = _reply_samples(tok, splits.test[: cfg.num_samples], cfg)
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens)
    gen_b, gen_a = _base_and_tuned(model, base_model, tok, prompts, sampling, cfg, with_base)
    generations = ({"base": gen_b} if with_base else {}) | {tuned: gen_a}
    bertscores, samples = scored_samples(records, generations, [[ref] for ref in references])
    return {"metrics": rows, "primary": "loss", "lower_is_better": True, "samples": samples, "bertscore": SETUP,
            "sample_bertscore_f1": bertscores, "heldout": {"examples": len(encoded),
                                                           "tokens": sum(sum(lab != IGNORE for lab in e.labels)
                                                                         for e in encoded)}}


def run_config(run_dir: Path) -> RunConfig:
    """The exact config a run was trained with, from its run.json."""
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        raise UserError(f"{run_dir}: no run.json; pass a run directory written by `lorakit train`")
    return validate(RunConfig(**json.loads(f.read_text())["config"]), str(f))


def evaluate_run(run_dir: str | Path, max_records: int = 0, with_base: bool = True, data: str | None = None,
                 out: str | Path | None = None) -> tuple[dict, Path]:
    """Evaluate a trained run on its test split, or on `data` (any file in the run's task format); writes eval.json,
    report.html and samples into run_dir (with `data`: into `out`, default RUN/eval-<file name>). Returns the
    result and the directory written."""
    from .report import print_table, write_report
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if max_records:
        cfg.max_eval_records = max_records
    t0 = time.perf_counter()
    splits = load_splits(cfg)
    out_dir = run_dir
    if data:
        out_dir = Path(out) if out else run_dir / f"eval-{Path(data).stem}"
        splits = with_test_file(cfg, splits, data, out_dir, max_records)
    for stats in splits.loaded.values():
        print(f"data: {stats}")
    full = cfg.method == "full"
    model, tok, _ = load_trained(run_dir / ("model" if full else "adapter"), model=cfg.model)
    if cfg.task == "classify":
        result = eval_classify(model, tok, splits, cfg, cfg.method, with_base)
    else:
        base = load_model(cfg.model, cfg.task)[0] if full and with_base else None  # a full fine-tune has no "off"
        fn = eval_summarize if cfg.task == "summarize" else eval_instruct
        result = fn(model, tok, splits, cfg, cfg.method, with_base, base)
    samples = result.pop("samples")
    result.update(task=cfg.task, run=cfg.name, model=cfg.model, method=cfg.method, tuned=cfg.method,
                  test_examples=len(splits.test), seconds=time.perf_counter() - t0,
                  test_data=splits.loaded["eval_data"].path if data else "the run's test split")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out_dir / "eval_samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    write_report(run_dir, result, samples, out_dir=out_dir)
    print_table(result)
    return result, out_dir


def with_test_file(cfg: RunConfig, splits: Splits, data: str, out_dir: Path, max_records: int = 0) -> Splits:
    """The run's splits with `data` (read in the run's task format and labels; all of it, or its first
    max_records) as the test split. An evaluation of another file already in out_dir is a UserError: it is never
    overwritten."""
    previous = out_dir / "eval.json"
    path = data_path(cfg, data)
    if previous.is_file() and json.loads(previous.read_text()).get("test_data") != str(path):
        raise UserError(f"{out_dir} holds the evaluation of another file; pass --out NEW_DIR")
    if cfg.task == "classify":
        cfg.labels = list(splits.labels)  # the run's label ids; a label it was not trained on is an error
    extra = load_file(cfg, path)
    splits.test = examples_of(extra)[: max_records or None]
    splits.loaded = {"eval_data": extra.stats}
    return splits
