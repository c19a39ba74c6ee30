"""The examples the data layer hands on: labelled texts, prompt / response pairs, and encoded token rows whose labels
mark what the loss covers (IGNORE elsewhere). Conversations are conversations.py's."""
from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100  # label value the loss skips


@dataclass
class TextExample:
    text: str
    label: int


@dataclass
class PromptExample:
    """One prompt → response pair; `references` holds every reference answer (DialogSum test has three)."""

    prompt_input: str
    response: str
    instruction: str = ""
    references: list[str] = field(default_factory=list)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
