"""Evaluating a classifier: the adapted model against the base (its new head untrained: chance), a majority-class
baseline and a head-only baseline (a fresh head trained on frozen base features)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data import batcher
from ..inference.precision import cast_for_inference, dtype_of
from ..files import atomic_file
from ..models import head_name, is_seq2seq, load_model
from .metrics import classification_metrics

BASELINE = "head_only_baseline.safetensors"  # kept in the run: the head-only baseline's head and the majority class


@torch.no_grad()
def _classify(model, tok, examples, cfg, features: bool = False, desc: str = "classify"):
    """Predicted labels; with features=True, also the pooled vectors the head reads (for the head-only baseline).
    A progress bar (`desc`) with its ETA."""
    collate = batcher(cfg, tok, is_seq2seq(model))
    model.eval()
    head = model.get_submodule(head_name(model))
    grabbed: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: grabbed.append(inp[0])) if features else None
    preds, feats = [], []
    step = cfg.batch_size * 2
    for i in tqdm(range(0, len(examples), step), desc=desc, unit="batch", mininterval=1.0, leave=False):
        batch = collate(examples[i:i + step])
        batch.pop("labels")
        preds += model(**batch).logits.argmax(-1).tolist()
        if features:
            x = grabbed.pop()
            if x.dim() == 3:  # decoder classifiers pool at the last non-pad token, as transformers does
                ids = batch["input_ids"]
                last = (torch.arange(ids.shape[1]) * (ids != model.config.pad_token_id)).argmax(-1)
                x = x[torch.arange(x.shape[0]), last]
            feats.append(x.float())  # the baseline head trains in fp32 whatever the model computes in
    if hook:
        hook.remove()
    return preds, (torch.cat(feats) if features else None)


def train_head(train_x: torch.Tensor, y: torch.Tensor, head: torch.nn.Linear, seed: int, epochs: int = 60
               ) -> torch.nn.Linear:
    """A fresh head like `head`, trained on frozen base features: the fair baseline for a LoRA classifier."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(train_x.shape[1], head.out_features, bias=head.bias is not None)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="head-only baseline: train the head", unit="epoch", mininterval=1.0,
                  leave=False):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(layer(train_x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return layer.requires_grad_(False)


def baselines(base, tok, train: list, cfg, cache: Path | None) -> tuple[torch.nn.Linear, int] | None:
    """The head-only baseline's head and the majority class of the training split. Kept in the run (`cache`) the
    first time, so an evaluation on another file (eval --data) needs neither the training data nor minutes of
    retraining; None when neither the kept ones nor the training data are there."""
    dtype = dtype_of(base)  # features in bf16, int8 and fp32 differ: so do their heads
    key = (hashlib.sha256(json.dumps([[e.text, e.label] for e in train] + [dtype]).encode()).hexdigest() if train
           else None)
    if cache is not None and cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if key is None or meta.get("train") == key:
            layer = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0], bias="bias" in weights)
            layer.load_state_dict(weights)
            return layer.requires_grad_(False), int(meta["majority"])
    if not train:
        return None
    _, train_x = _classify(base, tok, train, cfg, features=True, desc="head-only baseline: train features")
    y = torch.tensor([e.label for e in train])
    layer = train_head(train_x, y, base.get_submodule(head_name(base)), cfg.seed)
    majority = int(torch.bincount(y, minlength=layer.out_features).argmax())
    if cache is not None:
        with atomic_file(cache) as tmp:
            save_file(dict(layer.state_dict()), str(tmp), metadata={"train": key, "majority": str(majority)})
    return layer, majority


def eval_classify(model, tok, splits, cfg, tuned: str = "lora", with_base: bool = True, cache: Path | None = None
                  ) -> dict:
    """Accuracy, macro-F1 and confusion of the adapted model, and with_base the base (untrained head), the
    majority class and the head-only baseline (kept in `cache`) on the same test examples."""
    gold = [e.label for e in splits.test]
    n = len(splits.labels)
    adapted, _ = _classify(model, tok, splits.test, cfg, desc=f"classify ({tuned})")
    samples = [{"text": e.text, "label": splits.labels[e.label]} for e in splits.test]
    rows = {}
    if with_base:
        torch.manual_seed(cfg.seed)
        base, _ = load_model(cfg.model, "classify", num_labels=n)
        cast_for_inference(base, dtype_of(model))  # the adapted model's dtype
        base_pred, test_x = _classify(base, tok, splits.test, cfg, features=True, desc="classify (base)")
        rows["base (untrained head)"] = classification_metrics(base_pred, gold, n)
        for s, b in zip(samples, base_pred):
            s["base"] = splits.labels[b]
        found = baselines(base, tok, splits.train, cfg, cache)
        if found is None:
            print(f"lorakit: the majority-class and head-only baselines are left out: they are trained on the run's "
                  f"training data ({cfg.data}), which is not there, and this run has none kept yet")
        else:
            layer, majority = found
            with torch.no_grad():
                head_pred = layer(test_x).argmax(-1).tolist()
            rows["majority class"] = classification_metrics([majority] * len(gold), gold, n)
            rows["head only"] = classification_metrics(head_pred, gold, n)
            for s, h in zip(samples, head_pred):
                s["head_only"] = splits.labels[h]
    rows[tuned] = classification_metrics(adapted, gold, n)
    for s, a in zip(samples, adapted):
        s[tuned] = splits.labels[a]
    return {"metrics": rows, "primary": "accuracy", "labels": splits.labels, "samples": samples}
