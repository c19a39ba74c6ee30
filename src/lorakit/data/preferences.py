"""Preference data: pairs of replies to one prompt, the chosen and the rejected, read from the forms people export
them in, checked, and encoded in the model's chat template with each reply as its assistant turn.

Forms, detected per record and counted in the load notes (`format <name>`):
  explicit   {"prompt": str, "chosen": str, "rejected": str}                     (TRL's standard form)
  messages   {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}  (TRL's conversational form)
  implicit   {"chosen": [messages], "rejected": [messages]}: the prompt is the turns the two share
  hh         {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}: Anthropic HH-RLHF's raw text
  ranking    {"instruction", "input", "chosen", "rejected"} (+ "system", "history")  (LLaMA-Factory's form)
A pair that cannot be trained on (an empty reply, identical replies, prompts that differ, a conversation that does
not end with the assistant's reply, a missing field) is one DataError naming file, record and field, or with
skip_invalid skipped and counted by reason.

Encoded, a pair is its prompt's tokens once and each reply's tokens with labels on the reply's content and its
end-of-turn token (as chat data trains an assistant turn). Too long for max_length (prompt plus the longer reply):
the oldest prompt exchanges go first, the replies stay; a reply is cut only when the last exchange alone does not
fit. `pair_batch` puts each pair in one packed row, the two replies attending to one copy of the prompt.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError
from .chat_template import label_tokens, render_with_spans
from .collate import packed_batch
from .conversations import Conversation, Message, clean_turns, encode_each, fit_to_length, parse_turns
from .examples import IGNORE, EncodedExample
from .readers import LoadStats, collect_noted, get_text

HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferencePair:
    """One prompt (its turns, the last the user's) and two replies to it."""

    prompt: list[Message]
    chosen: str
    rejected: str
    source: str = ""  # file and record, for errors while encoding

    def history(self) -> list[dict]:
        """The prompt's turns as chat messages (what a model continues to reply)."""
        return [{"role": m.role, "content": m.content} for m in self.prompt]


@dataclass
class EncodedPair:
    """A pair in tokens: the prompt once, and each reply's tokens with their labels (IGNORE where the loss does not
    look). `reference` holds the reference model's log-probabilities of (chosen, rejected) once computed."""

    prompt_ids: list[int]
    chosen: EncodedExample
    rejected: EncodedExample
    reference: tuple[float, float] | None = None

    def rows(self) -> list[EncodedExample]:
        """The pair as two examples that start with the same prompt: one packed row keeps the prompt once."""
        return [EncodedExample(self.prompt_ids + r.input_ids, [IGNORE] * len(self.prompt_ids) + r.labels)
                for r in (self.chosen, self.rejected)]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.chosen.input_ids) + len(self.rejected.input_ids)


# ---------------------------------------------------------------------------------------------------- reading

def detect_format(rec: dict, where: str) -> str:
    if "instruction" in rec:
        return "ranking"
    if "prompt" in rec:
        return "messages" if isinstance(rec["prompt"], list) else "explicit"
    chosen = rec.get("chosen")
    if isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
        return "hh"
    if isinstance(chosen, list):
        return "implicit"
    missing = next((k for k in ("chosen", "rejected") if k not in rec), "prompt")
    raise DataError(f"{where}: missing field {missing!r} (a pair is prompt + chosen + rejected, chosen and rejected as "
                    "whole conversations, HH's \"\\n\\nHuman: ...\" text, or instruction / input / chosen / rejected); "
                    f"fields: {', '.join(map(str, rec)) or 'none'}", reason=f"missing field {missing!r}")


def hh_turns(text: str, where: str, key: str) -> list[Message]:
    """HH-RLHF's raw "\\n\\nHuman: ...\\n\\nAssistant: ..." text as turns."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: field {key!r}: text before the first \"Human:\" turn", reason="not HH text")
    return [Message("user" if role == "Human" else "assistant", content.strip())
            for role, content in zip(parts[1::2], parts[2::2])]


def reply_text(rec: dict, where: str, key: str) -> str:
    """A reply: a string, or (the conversational form) a list of one assistant message."""
    value = rec.get(key)
    if isinstance(value, list):
        turns, _ = parse_turns(value, where, key)
        if len(turns) != 1 or turns[0].role != "assistant":
            raise DataError(f"{where}: field {key!r} must hold one assistant message, got "
                            f"{', '.join(t.role for t in turns) or 'none'}", reason=f"{key!r} not one reply")
        return turns[0].content
    return get_text(rec, key, where, allow_empty=True)


def split_conversations(chosen: list[Message], rejected: list[Message], where: str) -> tuple[list[Message], str, str]:
    """(prompt, chosen reply, rejected reply) from two whole conversations that share all but their last turn."""
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1].role != "assistant":
            raise DataError(f"{where}: field {key!r}: the conversation must end with the assistant's reply, it ends "
                            f"with {turns[-1].role + ' turn' if turns else 'no turn'}", reason="last turn not the assistant's")
    if [(m.role, m.content) for m in chosen[:-1]] != [(m.role, m.content) for m in rejected[:-1]]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if (a.role, a.content) != (b.role, b.content)),
                  min(len(chosen), len(rejected)) - 1)
        raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last turn (at turn {at}): a pair's "
                        "replies must answer the same prompt", reason="prompts differ")
    return chosen[:-1], chosen[-1].content, rejected[-1].content


def prompt_and_replies(rec: dict, fmt: str, where: str) -> tuple[list[Message], str, str, Counter]:
    """The record's prompt turns, its two replies, and the roles that were mapped, in any of the forms."""
    mapped = Counter()
    if fmt == "hh":
        chosen, rejected = (hh_turns(get_text(rec, k, where), where, k) for k in ("chosen", "rejected"))
        return (*split_conversations(chosen, rejected, where), mapped)
    if fmt == "implicit":
        (chosen, m1), (rejected, m2) = (parse_turns(rec.get(k), where, k) for k in ("chosen", "rejected"))
        return (*split_conversations(chosen, rejected, where), m1 + m2)
    if fmt == "explicit":
        prompt = [Message("user", get_text(rec, "prompt", where))]
    elif fmt == "messages":
        prompt, mapped = parse_turns(rec["prompt"], where, "prompt")
    else:
        prompt = ranking_prompt(rec, where)
    return prompt, reply_text(rec, where, "chosen"), reply_text(rec, where, "rejected"), mapped


def ranking_prompt(rec: dict, where: str) -> list[Message]:
    """LLaMA-Factory's prompt: the system prompt, the history's exchanges, then instruction and input joined."""
    turns = [Message("system", get_text(rec, "system", where))] if rec.get("system") else []
    for i, exchange in enumerate(rec.get("history") or []):
        if not (isinstance(exchange, list) and len(exchange) == 2 and all(isinstance(t, str) for t in exchange)):
            raise DataError(f"{where}: field 'history'[{i}] must be a [question, answer] pair of texts",
                            reason="bad history")
        turns += [Message("user", exchange[0]), Message("assistant", exchange[1])]
    text = get_text(rec, "instruction", where)
    extra = get_text(rec, "input", where, allow_empty=True) if "input" in rec else ""
    return turns + [Message("user", f"{text}\n{extra}" if extra.strip() else text)]


def parse_pair(rec: dict, where: str) -> tuple[str, PreferencePair, Counter]:
    """(format, the pair, what was mapped or cleaned) of one record; a DataError for a pair that cannot be used."""
    fmt = detect_format(rec, where)
    prompt, chosen, rejected, notes = prompt_and_replies(rec, fmt, where)
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise DataError(f"{where}: field {key!r}: the reply is empty", reason=f"empty {key} reply")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: fields 'chosen' and 'rejected': the two replies are the same text",
                        reason="identical replies")
    if not prompt or prompt[-1].role != "user":
        raise DataError(f"{where}: the prompt must end with the user's turn, it ends with "
                        f"{prompt[-1].role + ' turn' if prompt else 'nothing'}", reason="prompt not ending with user")
    messages, changes = clean_turns(prompt + [Message("assistant", chosen)], where)
    return fmt, PreferencePair(messages[:-1], chosen, rejected, where), notes + changes


@dataclass
class PreferenceData:
    """The pairs read from one file, with the load counts (formats seen and clean-ups in stats.notes)."""

    pairs: list[PreferencePair]
    stats: LoadStats = field(default_factory=lambda: LoadStats(""))

    @property
    def examples(self) -> list[PreferencePair]:
        return self.pairs

    @classmethod
    def load(cls, path: str | Path, strict: bool = True) -> "PreferenceData":
        def parse(rec: dict, where: str) -> tuple[PreferencePair, Counter]:
            fmt, pair, changes = parse_pair(rec, where)
            return pair, changes + Counter({f"format {fmt}": 1})

        return cls(*collect_noted(path, strict, parse))


# --------------------------------------------------------------------------------------------------- encoding

def _render(tokenizer, prompt: list[Message], reply: str, template: str) -> tuple[list[int], list[int], bool]:
    """(token ids, labels, whether the system prompt was folded) of prompt + reply, the reply its assistant turn."""
    conversation = [{"role": m.role, "content": m.content} for m in prompt] + [{"role": "assistant", "content": reply}]
    rendered = render_with_spans(tokenizer, conversation, [len(prompt)], template)
    ids, trained = label_tokens(tokenizer, rendered)
    return ids, [t if keep else IGNORE for t, keep in zip(ids, trained)], rendered.folded_system


def encode_pair(tokenizer, pair: PreferencePair, max_length: int, template: str, stats: LoadStats) -> EncodedPair:
    """The pair in tokens, fitted to max_length (prompt plus the longer reply), every change counted."""
    longer = max(pair.chosen, pair.rejected, key=len)
    fitted, dropped = fit_to_length(tokenizer, Conversation(pair.prompt + [Message("assistant", longer)], pair.source),
                                    template, max_length, "last")
    prompt = fitted.messages[:-1]
    (c_ids, c_labels, folded), (r_ids, r_labels, _) = (_render(tokenizer, prompt, reply, template)
                                                       for reply in (pair.chosen, pair.rejected))
    first = min(next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
                for labels in (c_labels, r_labels))
    n = next((i for i, (a, b) in enumerate(zip(c_ids[:first], r_ids[:first])) if a != b), min(first, len(c_ids),
                                                                                             len(r_ids)))
    if n >= max_length:
        raise DataError(f"its prompt alone is {n} tokens, longer than max_length ({max_length}); raise max_length or "
                        "shorten it", reason="prompt longer than max_length")
    replies = []
    for ids, labels in ((c_ids, c_labels), (r_ids, r_labels)):
        if len(ids) > max_length:
            stats.notes["reply cut to fit max_length (its last exchange alone is longer)"] += 1
        replies.append(EncodedExample(ids[n:max_length], labels[n:max_length]))
    if dropped:
        stats.notes["prompt shortened: oldest exchanges dropped to fit max_length"] += 1
    if folded:
        stats.notes["system prompt folded into the first user turn (the template has no system role)"] += 1
    return EncodedPair(c_ids[:n], *replies)


def encode_pairs(pairs: list[PreferencePair], tokenizer, max_length: int, template: str = "chat",
                 stats: LoadStats | None = None, strict: bool = True) -> list[EncodedPair]:
    """Every pair encoded; one that cannot be (its prompt alone fills max_length, its template refuses it) is a
    DataError naming it, or with strict=False skipped and counted in stats.skipped."""
    return encode_each(pairs, lambda pair, stats: encode_pair(tokenizer, pair, max_length, template, stats),
                       tokenizer, template, stats, strict, "pairs")


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> dict:
    """One packed row per pair: the prompt once, then the chosen reply's block, then the rejected reply's, each
    attending to the prompt and itself (collate.packed_batch with a shared prefix). `segments` says which block
    each position is in (0 chosen, 1 rejected; -2 prompt, -1 padding); `reference`, when every pair has its
    precomputed reference log-probabilities, holds them (pairs, 2)."""
    batch = packed_batch([pair.rows() for pair in pairs], pad_id, share_prefix=True, segments=True)
    if pairs and all(p.reference is not None for p in pairs):
        batch["reference"] = torch.tensor([p.reference for p in pairs], dtype=torch.float64)
    return batch
