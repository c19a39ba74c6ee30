"""Text generation for base and adapted models: greedy or sampled, batched or streamed, merged or not."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import torch

from ..engine import LoRAError, disable_adapters, lora_layers, merge, unmerge
from ..models import is_seq2seq
from .decode import decode, supports
from .int8 import holds_int8
from .sampling import Choice, Sampling


def _adds_special_tokens(template: str) -> bool:
    """A chat template writes its own special tokens; the Alpaca prompt gets the tokenizer's (a BOS)."""
    return template == "alpaca"


def _encode(tok, prompts: list[str], template: str, device) -> dict:
    side, tok.padding_side = tok.padding_side, "left"  # decoder-only models continue from the last real token
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=_adds_special_tokens(template))
    finally:
        tok.padding_side = side
    return {k: v.to(device) for k, v in enc.items()}


@contextlib.contextmanager
def merged(model, enabled: bool = True):
    """Run with the active adapter folded into the weights (base-model speed), then take it out again. Not where
    the base is held in bf16 or int8 (`--dtype`): folding in and out would round the base weights (and an int8 base
    would be bf16 after), so the adapter runs unmerged there, as the decode step's own kernels run it."""
    enabled = enabled and not any(low_precision_base(layer) for _, layer in lora_layers(model))
    if enabled:
        merge(model)
    try:
        yield model
    finally:
        if enabled:
            unmerge(model)


def low_precision_base(layer) -> bool:
    """Whether a LoRA layer's (linear or embedding) frozen weight is held in int8 codes or dense bf16."""
    return holds_int8(layer) or (layer.weight is not None and layer.weight.dtype == torch.bfloat16)


def new_token_counts(new: torch.Tensor, eos_id: int | None) -> list[int]:
    """Tokens each row generated: up to and including its first EOS (the rest is padding after it stopped)."""
    if eos_id is None:
        return [new.shape[1]] * new.shape[0]
    ended = (new == eos_id).int().cumsum(1)
    return ((ended == 0) | ((ended == 1) & (new == eos_id))).sum(1).tolist()


def prompt_ids(tok, prompts: list[str], template: str) -> list[list[int]]:
    """The prompts' token ids as generation feeds them (the tokenizer's special tokens for the Alpaca prompt only)."""
    return tok(prompts, add_special_tokens=_adds_special_tokens(template))["input_ids"]


def rows_in_use(model) -> list[str | None] | None:
    """The adapter of each row while `adapters_by_row` is in effect (the batch must keep those rows), else None."""
    for _, layer in lora_layers(model):
        if layer.row_adapters is not None:
            return layer.row_adapters
    return None


def _decode(model, tok, ids: list[list[int]], sampling: Sampling, slots: int) -> Iterator[tuple[int, int]]:
    """The decode loop's (prompt index, token) events for token-id prompts, EOS and padding from `tok`, sampling
    from a generator seeded by `sampling.seed`."""
    device = next(model.parameters()).device
    generator = None if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return decode(model, ids, Choice(sampling, generator), _eos_ids(tok), pad, slots=slots)


def _eos_ids(tok) -> set[int]:
    return set() if tok.eos_token_id is None else {tok.eos_token_id}


def generate(model, tok, prompts: list[str], sampling: Sampling, template: str = "alpaca",
             batch_size: int = 16, progress: str | None = None, engine: str = "auto") -> list[str]:
    """Completions for `prompts` (already templated for causal models; raw inputs for seq2seq), in their order.

    GPT-2 and Llama-family decoders run lorakit's decode loop (`decode.py`): a static KV cache and continuous
    batching over `batch_size` rows, prompts taken shortest first. Other models (or engine="transformers") run
    transformers' `generate` in batches of similar-length prompts. With `progress`, a bar over the prompts with the
    ETA and the generated tokens/s."""
    from tqdm.auto import tqdm
    model.eval()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    bar = tqdm(total=len(prompts), desc=f"generate {progress}", disable=progress is None or len(prompts) < 2,
               mininterval=2.0)
    t0 = time.perf_counter()

    def count(done: int, tokens: int) -> None:
        bar.update(done)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}", refresh=False)
    try:
        seq2seq = is_seq2seq(model)
        ids = [] if seq2seq or not prompts else prompt_ids(tok, prompts, template)
        longest = max(map(len, ids), default=0) + sampling.max_new_tokens
        if engine == "transformers" or seq2seq or not supports(model, longest):
            return _generate_with_transformers(model, tok, prompts, sampling, template, batch_size, count)
        return _generate_with_decode_loop(model, tok, ids, sampling, batch_size, count)
    finally:
        bar.close()


@torch.no_grad()
def _generate_with_decode_loop(model, tok, ids: list[list[int]], sampling, batch_size, count) -> list[str]:
    fixed_rows = rows_in_use(model)
    if fixed_rows is not None:  # row i is adapter i's: keep the given order, all rows in one batch
        if len(fixed_rows) != len(ids):
            raise LoRAError(f"{len(ids)} prompts for adapters_by_row over {len(fixed_rows)} rows")
        order, batch_size = list(range(len(ids))), len(ids)
    else:
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    made: list[list[int]] = [[] for _ in ids]
    eos = _eos_ids(tok)
    tokens = 0
    for j, token in _decode(model, tok, [ids[i] for i in order], sampling, batch_size):
        made[order[j]].append(token)
        tokens += 1
        if token in eos or len(made[order[j]]) == sampling.max_new_tokens:
            count(1, tokens)
    return [tok.decode(t, skip_special_tokens=True).strip() for t in made]


@torch.no_grad()
def _generate_with_transformers(model, tok, prompts, sampling, template, batch_size, count) -> list[str]:
    """transformers' `generate` over batches of similar-length prompts: less padding in each, fewer wasted steps."""
    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[str | None] = [None] * len(prompts)
    tokens = 0
    for i in range(0, len(prompts), batch_size):
        rows = order[i:i + batch_size]
        chunk = [prompts[j] for j in rows]
        if seq2seq:
            enc = {k: v.to(device) for k, v in tok(chunk, return_tensors="pt", padding=True, truncation=True).items()}
        else:
            enc = _encode(tok, chunk, template, device)
        ids = model.generate(**enc, **sampling.kwargs(tok))
        new = ids if seq2seq else ids[:, enc["input_ids"].shape[1]:]
        for j, text in zip(rows, tok.batch_decode(new, skip_special_tokens=True)):
            out[j] = text.strip()
        tokens += sum(new_token_counts(new, tok.eos_token_id))
        count(len(rows), tokens)
    return out


def generate_base_and_adapted(model, tok, prompts: list[str], sampling: Sampling, template: str = "alpaca",
                              progress: bool = False) -> tuple[list[str], list[str]]:
    """(base completions, adapted completions) for the same prompts: adapter merged for speed, then disabled."""
    with merged(model):
        adapted = generate(model, tok, prompts, sampling, template, progress="adapted" if progress else None)
    with disable_adapters(model):
        base = generate(model, tok, prompts, sampling, template, progress="base" if progress else None)
    return base, adapted


def stream(model, tok, prompt: str, sampling: Sampling, template: str = "alpaca",
           stats: dict | None = None) -> Iterator[str]:
    """Yield the completion piece by piece as it is generated; stops at EOS or max_new_tokens.
    `stats["tokens"]`, if given, counts the new tokens so far (the pieces are text, not tokens)."""
    model.eval()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    counts = stats if stats is not None else {}
    counts["tokens"] = 0
    ids = [] if is_seq2seq(model) else prompt_ids(tok, [prompt], template)
    if not ids or not supports(model, len(ids[0]) + sampling.max_new_tokens):
        yield from _stream_with_transformers(model, tok, prompt, sampling, template, counts)
        return
    made: list[int] = []
    shown = ""
    for _, token in _decode(model, tok, ids, sampling, slots=1):  # decode's steps run without autograd; nothing is held across a yield here
        made.append(token)
        counts["tokens"] = len(made)
        text = tok.decode(made, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest of its bytes
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text


def _stream_with_transformers(model, tok, prompt: str, sampling: Sampling, template: str,
                              counts: dict) -> Iterator[str]:
    from transformers import TextIteratorStreamer
    device = next(model.parameters()).device
    enc = _encode(tok, [prompt], template, device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    put = streamer.put

    def counting_put(value: torch.Tensor) -> None:
        if not streamer.next_tokens_are_prompt:
            counts["tokens"] += value.numel()
        put(value)

    streamer.put = counting_put
    errors: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)
        try:
            with torch.no_grad():
                model.generate(**enc, **sampling.kwargs(tok), streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([Stop()]))
        except BaseException as e:  # surfaced to the caller below, not lost in the thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:  # also when the consumer stops early (a closed web page): end the generation, free the model
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
