"""Evaluating a generative run, base against adapted on the same examples: ROUGE and BERTScore for summaries; held-out
response loss and perplexity, with sample replies and their BERTScore, for instructions and chat."""
from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from ..data import IGNORE, batcher, encode_examples, format_prompt
from ..data.conversations import heldout_reply
from ..engine import disable_adapters
from ..inference import Sampling, generate, generate_base_and_adapted
from ..models import is_seq2seq
from ..training.loss import heldout_loss_sum
from .bertscore import SETUP, bertscore_f1
from .metrics import rouge


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
def response_loss(model, examples, collate, batch_size: int, desc: str = "held-out loss") -> float:
    """Token-weighted mean cross-entropy over the response tokens of `examples` (the same loss as validation)."""
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", mininterval=1.0, leave=False):
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
    encoded = encode_examples(cfg, splits.test, tok, is_seq2seq(model))
    collate = batcher(cfg, tok, is_seq2seq(model))
    losses = {}
    if with_base:
        with disable_adapters(model) if base_model is None else contextlib.nullcontext():
            losses["base"] = response_loss(base_model or model, encoded, collate, cfg.batch_size, "held-out loss (base)")
    losses[tuned] = response_loss(model, encoded, collate, cfg.batch_size, f"held-out loss ({tuned})")
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
