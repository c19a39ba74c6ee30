"""Evaluating a classifier: the adapted model against the base (its new head untrained: chance), a majority-class
baseline and a head-only baseline (a fresh head trained on frozen base features)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data import batcher
from ..models import head_name, is_seq2seq, load_model
from .metrics import classification_metrics


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
            feats.append(x)
    if hook:
        hook.remove()
    return preds, (torch.cat(feats) if features else None)


def head_only_baseline(base, tok, train, test, cfg, epochs: int = 60) -> list[int]:
    """Train only a fresh head on frozen base features (cached once): the fair baseline for a LoRA classifier."""
    _, train_x = _classify(base, tok, train, cfg, features=True, desc="head-only baseline: train features")
    _, test_x = _classify(base, tok, test, cfg, features=True, desc="head-only baseline: test features")
    y = torch.tensor([e.label for e in train])
    head = base.get_submodule(head_name(base))
    torch.manual_seed(cfg.seed)
    layer = torch.nn.Linear(train_x.shape[1], head.out_features, bias=head.bias is not None)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(epochs), desc="head-only baseline: train the head", unit="epoch", mininterval=1.0,
                  leave=False):
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
    adapted, _ = _classify(model, tok, splits.test, cfg, desc=f"classify ({tuned})")
    samples = [{"text": e.text, "label": splits.labels[e.label]} for e in splits.test]
    rows = {}
    if with_base:
        torch.manual_seed(cfg.seed)
        base, _ = load_model(cfg.model, "classify", num_labels=n)
        base_pred, _ = _classify(base, tok, splits.test, cfg, desc="classify (base)")
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
