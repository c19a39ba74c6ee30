"""The metrics of an evaluation: accuracy, macro-F1 and the confusion matrix; ROUGE (rouge-score, stemmed, best over
the references). BERTScore is bertscore.py's."""
from __future__ import annotations

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
