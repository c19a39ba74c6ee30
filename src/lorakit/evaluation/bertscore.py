"""BERTScore (Zhang et al., 2020) beside ROUGE: how close a generation is to its reference in meaning, where ROUGE
only counts shared words.

Each token of the candidate is matched to its most similar reference token (cosine of contextual embeddings) for
precision, and the other way round for recall; F1 combines them, and with several references the best F1 counts.
The `bert-score` package computes it, with the embedded all-MiniLM-L6-v2 as the encoder (offline) and its last
layer, no idf weighting and no baseline rescaling. Scores depend on the encoder and layer, so they are comparable
only with scores made the same way: eval.json records which (`SETUP`).
"""
from __future__ import annotations

import functools

from tqdm.auto import tqdm

from ..models import EMBEDDED, resolve_spec

ENCODER = "minilm"
CHUNK = 128  # predictions scored per call: a progress bar for long evaluations
LAYER = 6  # of 6: the layer all-MiniLM-L6-v2 was trained to make sentence embeddings from
SETUP = {"model": EMBEDDED[ENCODER][2], "layer": LAYER, "idf": False, "baseline_rescaled": False}


@functools.lru_cache(maxsize=1)
def _scorer():
    from bert_score import BERTScorer
    path, _ = resolve_spec(ENCODER)
    return BERTScorer(model_type=path, num_layers=LAYER, idf=False, rescale_with_baseline=False)


def bertscore_f1(predictions: list[str], references: list[list[str]]) -> list[float]:
    """BERTScore F1 of each prediction against its references (the best over them); 0 for an empty prediction or
    one without a non-empty reference (as bert-score scores them, which it cannot encode with transformers 5)."""
    refs = [[r for r in group if r.strip()] for group in references]
    scored = [i for i, (p, group) in enumerate(zip(predictions, refs)) if p.strip() and group]
    scores = [0.0] * len(predictions)
    chunks = [scored[k:k + CHUNK] for k in range(0, len(scored), CHUNK)]
    for chunk in tqdm(chunks, desc="BERTScore", unit="chunk", mininterval=1.0, leave=False, disable=len(chunks) < 2):
        _, _, f1 = _scorer().score([predictions[i] for i in chunk], [refs[i] for i in chunk], verbose=False,
                                   batch_size=32)
        for i, value in zip(chunk, f1.tolist()):
            scores[i] = value
    return scores
