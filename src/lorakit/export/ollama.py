"""Ollama's Modelfile beside a GGUF export: FROM, the prompt format the run was trained with as Ollama's Go TEMPLATE
(the chat template, or the Alpaca prompt), the SYSTEM prompt the chat template adds when a conversation has none,
and stop strings. So the model runs in Ollama with the prompt it was trained on."""
from __future__ import annotations

import re
from pathlib import Path

from ..config.choices import default_template
from ..data.chat_template import render, template_text
from ..data.prompts import ALPACA_PROMPT, SUMMARY_INSTRUCTION
from ..errors import DataError

# The system turn of each chat family, as its template renders it: what the template adds on its own shows there.
SYSTEM_TURN = (re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S),
               re.compile(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S))


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """(Ollama's Go TEMPLATE, stop strings) for the chat template's family: ChatML, Llama 3 or Mistral; (None, [])
    for another, which Ollama then takes from the GGUF's own chat template where it knows it."""
    t = chat_template or ""
    if "<|im_start|>" in t:
        return ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                '<|im_start|>assistant\n'), ["<|im_end|>", "<|im_start|>"]
    if "<|start_header_id|>" in t:
        return ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
                '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'), ["<|eot_id|>", "<|start_header_id|>"]
    if "[INST]" in t:
        return ('{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role '
                '"assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'), ["[INST]", "</s>"]
    return None, []


def default_system(tokenizer, template: str) -> str | None:
    """The system prompt the chat template renders when a conversation has none (SmolLM2's, Qwen2's, Llama 3's
    date line), or None."""
    try:
        text = render(tokenizer, [{"role": "user", "content": "\x00"}], template)
    except DataError:
        return None
    found = next((m for m in (p.search(text) for p in SYSTEM_TURN) if m), None)
    return found.group(1) if found and found.group(1).strip() else None


def alpaca_template(task: str) -> str:
    """The Alpaca prompt lorakit trains instruct and summarize runs on, with Ollama's {{ .Prompt }} in it."""
    if task == "summarize":
        return ALPACA_PROMPT[True].format(instruction=SUMMARY_INSTRUCTION, input="{{ .Prompt }}")
    return ALPACA_PROMPT[False].format(instruction="{{ .Prompt }}")


def write_modelfile(directory: Path, gguf_name: str, tokenizer, meta: dict) -> Path:
    """Ollama's Modelfile beside the GGUF (`ollama create NAME -f Modelfile`), in the prompt format of the run
    described by `meta` (its task and template)."""
    task = meta.get("task") or "instruct"
    template = meta.get("template") or default_template(task)
    system, stops = None, []
    if template == "alpaca":
        go_template = alpaca_template(task)
    else:
        go_template, stops = ollama_template(template_text(tokenizer, template)[0])
        system = default_system(tokenizer, template)
    lines = [f"FROM ./{gguf_name}"]
    if go_template:
        lines.append(f'TEMPLATE """{go_template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in dict.fromkeys(stops + ([tokenizer.eos_token] if tokenizer.eos_token else [])):
        lines.append(f'PARAMETER stop "{stop}"')
    path = directory / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
