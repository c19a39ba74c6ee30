"""How the next token is chosen: decoding settings (`Sampling`) and the choice from a row's logits in transformers'
order (repetition penalty, temperature, top-k, top-p), drawn from a seeded generator."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import UserError


@dataclass
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Settings no decoder can use are a UserError naming the setting (as its --flag reads)."""
        problems = [("max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, "a whole number >= 1"),
                    ("temperature", self.temperature, 0 <= self.temperature < math.inf, ">= 0 (0: greedy)"),
                    ("top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
                    ("top-k", self.top_k, self.top_k >= 0, ">= 0 (0: off)"),
                    ("repetition-penalty", self.repetition_penalty, 0 < self.repetition_penalty < math.inf,
                     "> 0 (1: off)")]
        for name, value, ok, wanted in problems:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise UserError(f"--{name} {value:g}: must be {wanted}")

    def kwargs(self, tok) -> dict:
        """The same settings as transformers' `generate` arguments."""
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
              "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)  # 0: off
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class Choice:
    """How the next token is picked from a row's logits under `sampling` (transformers' order: repetition penalty,
    temperature, top-k, top-p), drawing from `generator` (None: torch's global one)."""

    sampling: Sampling = field(default_factory=Sampling)
    generator: torch.Generator | None = None

    @classmethod
    def greedy(cls, max_new_tokens: int) -> Choice:
        return cls(Sampling(max_new_tokens=max_new_tokens))

    def scores(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The logits the next token is drawn from: -inf for tokens top-k or top-p rule out."""
        s = self.sampling
        if seen is not None:  # tokens already in a row: positive logits divided, negative multiplied
            p = s.repetition_penalty
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        if s.temperature <= 0:
            return logits
        logits = logits / s.temperature
        if 0 < s.top_k < logits.shape[-1]:
            kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:  # the smallest set of most likely tokens whose probability reaches top_p (at least 1)
            ordered, index = logits.sort(dim=-1, descending=False)
            cut = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
            cut[:, -1] = False
            logits = logits.masked_fill(cut.scatter(1, index, cut), float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The next token of each row: the best one (greedy), or one drawn from `scores`' softmax."""
        logits = self.scores(logits, seen)
        if self.sampling.temperature <= 0:
            return logits.argmax(-1)
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator).squeeze(1)
