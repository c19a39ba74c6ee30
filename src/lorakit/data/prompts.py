"""Prompt / response data: Alpaca-style instructions and DialogSum summaries, the prompt templates, and encoding with
the loss on the response only.

  InstructionData      Alpaca JSON array or JSONL with instruction / input / output
  SummarizationData    DialogSum JSONL with dialogue and summary (or summary1..3 references)
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .chat_template import render
from .examples import IGNORE, EncodedExample, PromptExample
from .readers import LoadStats, collect, get_text, iter_records

ALPACA_PROMPT = {
    True: ("Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    False: ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}
SUMMARY_INSTRUCTION = "Summarize the following dialogue in one or two sentences."


def format_prompt(tokenizer, instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """The prompt for an instruction: the Alpaca template, the model's chat template (template='chat') or ChatML."""
    if template in ("chat", "chatml"):
        content = instruction + (f"\n\n{input_text}" if input_text else "")
        return render(tokenizer, [{"role": "user", "content": content}], template, add_generation_prompt=True)
    if template != "alpaca":
        raise DataError(f"unknown template {template!r}: use 'alpaca', 'chat' or 'chatml'")
    return ALPACA_PROMPT[bool(input_text)].format(instruction=instruction, input=input_text)


class PromptData:
    """Shared encoding for instruction and summarization data: prompt tokens masked, loss on the response + EOS."""

    examples: list[PromptExample]
    stats: LoadStats

    def __init__(self, examples: list[PromptExample], stats: LoadStats) -> None:
        self.examples, self.stats = examples, stats

    def encode(self, tokenizer, max_length: int = 512, template: str = "alpaca", train_on_prompt: bool = False,
               stats: LoadStats | None = None) -> list[EncodedExample]:
        """Tokenise for a causal LM. Labels are IGNORE on the prompt (unless train_on_prompt), so the loss is on
        the response + EOS. Too long: the prompt loses its middle first, so the response always keeps at least
        half the budget; truncations are counted in stats.notes."""
        stats = stats or self.stats
        eos = tokenizer.eos_token_id
        out = []
        for ex in self.examples:
            text = format_prompt(tokenizer, ex.instruction, ex.prompt_input, template)
            prompt = tokenizer(text, add_special_tokens=template == "alpaca")["input_ids"]
            resp = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if len(prompt) + len(resp) > max_length:
                keep_r = min(len(resp), max(max_length - len(prompt), max_length // 2))
                keep_p = max_length - keep_r
                if keep_p < len(prompt):
                    head = keep_p // 2
                    prompt = prompt[:head] + prompt[len(prompt) - (keep_p - head):]
                    stats.notes["prompt truncated (response kept)"] += 1
                if keep_r < len(resp):
                    resp = resp[:keep_r]
                    stats.notes["response truncated"] += 1
            labels = (prompt if train_on_prompt else [IGNORE] * len(prompt)) + resp
            out.append(EncodedExample(prompt + resp, list(labels)))
        return out

    def encode_seq2seq(self, tokenizer, max_source: int = 512, max_target: int = 128) -> list[EncodedExample]:
        """Tokenise for an encoder-decoder: the prompt input (e.g. the dialogue) goes to the encoder."""
        out = []
        for ex in self.examples:
            src = tokenizer(ex.prompt_input, truncation=True, max_length=max_source)["input_ids"]
            tgt = tokenizer(text_target=ex.response, truncation=True, max_length=max_target)["input_ids"]
            out.append(EncodedExample(src, tgt))
        return out


class InstructionData(PromptData):
    """Alpaca-format instruction data."""

    @classmethod
    def load(cls, path: str | Path, strict: bool = True) -> "InstructionData":
        def parse(rec: dict, where: str) -> PromptExample:
            instruction = get_text(rec, "instruction", where)
            inp = get_text(rec, "input", where, allow_empty=True) if "input" in rec else ""
            output = get_text(rec, "output", where)
            return PromptExample(inp, output, instruction, [output])

        examples, stats = collect(path, iter_records(path, strict), parse, strict)
        return cls(examples, stats)


class SummarizationData(PromptData):
    """DialogSum-format data: `dialogue` and `summary`, or the test split's `summary1..3` (all kept as references)."""

    @classmethod
    def load(cls, path: str | Path, strict: bool = True) -> "SummarizationData":
        def parse(rec: dict, where: str) -> PromptExample:
            dialogue = get_text(rec, "dialogue", where)
            if "summary" in rec or not any(k.startswith("summary") for k in rec):
                refs = [get_text(rec, "summary", where)]
            else:
                refs = [get_text(rec, k, where) for k in sorted(rec) if k.startswith("summary")]
            return PromptExample(dialogue, refs[0], SUMMARY_INSTRUCTION, refs)

        examples, stats = collect(path, iter_records(path, strict), parse, strict)
        return cls(examples, stats)
