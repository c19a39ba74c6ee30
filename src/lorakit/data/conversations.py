"""Conversation data: OpenAI-style `messages` or ShareGPT `conversations` records, read, cleaned and encoded in the
model's chat template with the loss on the assistant's turns only.

Real chat exports are messy (ShareGPT V3: conversations that start with the assistant, empty turns, the same role
twice in a row, roles `chatgpt`, `bing`, `bard`). Each such record is either mapped to system / user / assistant
turns, with every change counted in the load notes, or refused with one line naming the file, record and field (with
skip_invalid: skipped and counted by reason). Too long for max_length: the oldest whole exchanges go first (the
system prompt stays); only when the last exchange alone is too long is its assistant turn cut.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .chat_template import label_tokens, render_chat, render_with_spans, template_text
from ..errors import DataError
from .examples import IGNORE, EncodedExample
from .readers import LoadStats, collect_noted

# field names per format: (turns, role, content)
FORMATS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}


@dataclass
class Message:
    role: str  # system, user or assistant
    content: str
    train: bool = True  # an assistant turn in the loss (a per-message "train": false leaves it out)


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # file and record, for errors while encoding

    def as_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def trained_turns(self, train_on: str = "all") -> list[int]:
        """Indices of the assistant turns the loss covers."""
        turns = [i for i, m in enumerate(self.messages) if m.role == "assistant" and m.train]
        return turns[-1:] if train_on == "last" else turns

    def until_last_reply(self) -> tuple[list[dict], str]:
        """(the history before the last assistant turn, that turn's content): a held-out prompt and its reference."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.as_dicts()[:last], self.messages[last].content


def _content(turn: dict, name: str, where: str) -> str:
    """A turn's text; OpenAI's list of {"type": "text"} parts is joined, any other kind of content refused."""
    value = turn.get(name)
    if isinstance(value, list):
        other = next(((i, p) for i, p in enumerate(value) if not (isinstance(p, dict) and p.get("type") == "text")),
                     None)
        if other is not None:
            i, part = other
            kind = f"of type {part.get('type')!r}" if isinstance(part, dict) and part.get("type") else \
                f"a {type(part).__name__} without a type"
            raise DataError(f"{where}: field {name!r}, part {i} is {kind}; lorakit trains text models: only "
                            "{\"type\": \"text\"} parts (drop the others, or skip_invalid / --skip-invalid to skip "
                            "such records)", reason=f"non-text part in {name!r}")
        value = "".join(str(p.get("text", "")) for p in value)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"{type(value).__name__}, not text"
        raise DataError(f"{where}: field {name!r} is {kind}", reason=f"non-text {name!r}")
    return value


def _turns(rec: dict, where: str) -> tuple[str, list[Message], Counter]:
    """(format, the record's turns with roles mapped, what was mapped) before any clean-up."""
    fmt = next((f for f, (key, _, _) in FORMATS.items() if key in rec), None)
    if fmt is None:
        raise DataError(f"{where}: missing field 'messages' (or ShareGPT's 'conversations'); fields: "
                        f"{', '.join(map(str, rec)) or 'none'}", reason="missing field 'messages'")
    key, role_field, content_field = FORMATS[fmt]
    turns, mapped = parse_turns(rec[key], where, key, role_field, content_field)
    return fmt, turns, mapped


def parse_turns(value, where: str, key: str, role_field: str = "role",
                content_field: str = "content") -> tuple[list[Message], Counter]:
    """Field `key` of a record (at `where`), a list of turn objects, as Messages with roles mapped to system / user /
    assistant; and what was mapped. Errors name the field and the turn's index in it."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of turns, got {type(value).__name__}",
                        reason=f"{key!r} not a list")
    turns, mapped = [], Counter()
    for j, turn in enumerate(value):
        at = f"{where}, {key}[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: a turn must be an object, got {type(turn).__name__}", reason="turn not an object")
        raw = turn.get(role_field)
        role = ROLE_NAMES.get(str(raw).lower()) if isinstance(raw, str) else None
        if role is None:
            raise DataError(f"{at}: field {role_field!r}: unknown role {raw!r} (known: {', '.join(ROLE_NAMES)})",
                            reason=f"unknown role {raw!r}")
        if raw != role:
            mapped[f"role {raw} -> {role}"] += 1
        train = turn.get("train", True)
        if not isinstance(train, bool):
            raise DataError(f"{at}: field 'train' must be true or false, got {train!r}", reason="non-boolean 'train'")
        turns.append(Message(role, _content(turn, content_field, at), train))
    return turns, mapped


def clean_turns(turns: list[Message], where: str) -> tuple[list[Message], Counter]:
    """Turns a chat template can render: no empty turns, system first, user first after it, roles alternating
    (same-role neighbours merged), no unanswered user turn at the end. Returns the turns and what was changed."""
    changes = Counter()
    kept = [t for t in turns if t.content.strip()]
    changes["empty turn dropped"] += len(turns) - len(kept)
    system = [kept.pop(0)] if kept and kept[0].role == "system" else []
    if any(t.role == "system" for t in kept):
        raise DataError(f"{where}: a system turn after the first turn; a system prompt must come first",
                        reason="system turn after the start")
    while kept and kept[0].role == "assistant":
        kept.pop(0)
        changes["leading assistant turn dropped (a conversation starts with the user)"] += 1
    merged: list[Message] = []
    for t in kept:
        if merged and merged[-1].role == t.role and merged[-1].train == t.train:
            merged[-1] = Message(t.role, f"{merged[-1].content}\n\n{t.content}", t.train)
            changes[f"consecutive {t.role} turns merged"] += 1
        elif merged and merged[-1].role == t.role:
            raise DataError(f"{where}: two assistant turns in a row, one trained and one not; put a user turn between",
                            reason="mixed train flags in a row")
        else:
            merged.append(t)
    while merged and merged[-1].role == "user":
        merged.pop()
        changes["trailing user turn dropped (nothing answers it)"] += 1
    if not any(t.role == "assistant" and t.train for t in merged):
        why = "no turns" if not turns else "no assistant turn to train on"
        raise DataError(f"{where}: {why}", reason=why)
    return system + merged, +changes


@dataclass
class ChatData:
    """Conversations read from one file, with the load counts (formats seen and clean-ups in stats.notes)."""

    conversations: list[Conversation]
    stats: LoadStats = field(default_factory=lambda: LoadStats(""))

    @classmethod
    def load(cls, path: str | Path, strict: bool = True) -> "ChatData":
        def parse(rec: dict, where: str) -> tuple[Conversation, Counter]:
            fmt, turns, mapped = _turns(rec, where)
            messages, changes = clean_turns(turns, where)
            notes = mapped + changes + Counter({f"format {fmt}": 1})
            return Conversation(messages, f"{where}, field {FORMATS[fmt][0]!r}"), notes

        return cls(*collect_noted(path, strict, parse))


def fit_to_length(tokenizer, conv: Conversation, template: str, max_length: int, train_on: str) -> tuple[Conversation, int]:
    """The conversation with as few of its oldest exchanges (a user turn and what follows it) dropped as makes it fit
    max_length tokens, keeping the system prompt and the last trained turn; (that conversation, exchanges dropped).
    Binary search: fewer exchanges never render longer."""
    messages = conv.messages
    head = 1 if messages[0].role == "system" else 0
    starts = [i for i in range(head, len(messages)) if messages[i].role == "user"]
    last_trained = conv.trained_turns(train_on)[-1]
    starts = [s for s in starts if s < last_trained]  # dropping from a later start would lose every trained turn

    def keep_from(k: int) -> Conversation:
        return Conversation(messages[:head] + messages[starts[k]:], conv.source)

    def length(k: int) -> int:
        text, _ = render_chat(tokenizer, keep_from(k).as_dicts(), template)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if length(0) <= max_length:
        return conv, 0
    lo, hi = 1, len(starts) - 1  # the answer is in [lo, hi]; hi (only the last exchange) may still be too long
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if length(mid) <= max_length else (mid + 1, hi)
    return keep_from(hi), hi


def encode_conversations(conversations: list[Conversation], tokenizer, max_length: int, template: str = "chat",
                         train_on: str = "all", stats: LoadStats | None = None,
                         strict: bool = True) -> list[EncodedExample]:
    """Tokenise each conversation in the chat template; labels are IGNORE except on the trained assistant turns'
    content and end-of-turn tokens. Dropped turns, cut turns, folded system prompts and a ChatML fallback are
    counted in stats.notes. A conversation that cannot be encoded (its template refuses it, its last prompt alone fills
    max_length) is a DataError naming it, or with strict=False skipped and counted in stats.skipped."""
    return encode_each(conversations, lambda conv, stats: _encode_one(tokenizer, conv, max_length, template,
                                                                      train_on, stats),
                       tokenizer, template, stats, strict, "records")


def encode_each(items: list, encode_one, tokenizer, template: str, stats: LoadStats | None, strict: bool,
                what: str) -> list:
    """encode_one(item, stats) for every conversation or pair (each has a `.source`); one that fails is a DataError
    naming it, or with strict=False skipped and counted by reason. A ChatML fallback is noted once."""
    stats = stats if stats is not None else LoadStats("encode")
    _, note = template_text(tokenizer, template)
    if note and items:
        stats.notes[note] += 1
    out = []
    for item in items:
        try:
            out.append(encode_one(item, stats))
        except DataError as e:
            if strict:
                raise DataError(f"{item.source}: {e} (use skip_invalid / --skip-invalid to skip and count such "
                                f"{what})", e.reason) from None
            stats.skipped[e.reason] += 1
    return out


def _encode_one(tokenizer, conv: Conversation, max_length: int, template: str, train_on: str,
                stats: LoadStats) -> EncodedExample:
    fitted, dropped = fit_to_length(tokenizer, conv, template, max_length, train_on)
    rendered = render_with_spans(tokenizer, fitted.as_dicts(), fitted.trained_turns(train_on), template)
    ids, trained = label_tokens(tokenizer, rendered)
    if len(ids) > max_length:
        if not any(trained[:max_length]):
            raise DataError(f"its last user turn alone is longer than max_length ({max_length} tokens); raise "
                            "max_length or shorten it", reason="prompt longer than max_length")
        ids, trained = ids[:max_length], trained[:max_length]
        stats.notes["conversation cut inside an assistant turn (one exchange longer than max_length)"] += 1
    if dropped:
        stats.notes["conversation shortened: oldest exchanges dropped to fit max_length"] += 1
    if rendered.folded_system:
        stats.notes["system prompt folded into the first user turn (the template has no system role)"] += 1
    return EncodedExample(ids, [t if keep else IGNORE for t, keep in zip(ids, trained)])


def reply_prompt(tokenizer, history: list[dict], template: str = "chat") -> str:
    """The text a model continues to answer `history` (its last turn is the user's), in the chat template."""
    return render_chat(tokenizer, history, template, add_generation_prompt=True)[0]


def heldout_reply(tokenizer, conv: Conversation, template: str, max_length: int) -> tuple[str, list[dict], str]:
    """(prompt, history, reference) for scoring a reply: the history before the last assistant turn, shortened as
    for training (oldest exchanges first, to fit max_length with that turn), rendered to be continued."""
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    upto = Conversation(conv.messages[:last] + [Message("assistant", conv.messages[last].content)], conv.source)
    fitted, _ = fit_to_length(tokenizer, upto, template, max_length, "last")
    history, reference = fitted.until_last_reply()
    return reply_prompt(tokenizer, history, template), history, reference
