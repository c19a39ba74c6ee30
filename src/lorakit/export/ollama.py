"""Ollama's Modelfile beside a GGUF export: FROM, the chat template as Ollama's Go TEMPLATE, and stop strings."""
from __future__ import annotations

from pathlib import Path


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


def write_modelfile(directory: Path, gguf_name: str, chat_template: str | None, eos: str | None) -> Path:
    """Ollama's Modelfile beside the GGUF: `ollama create NAME -f Modelfile`."""
    template, stops = ollama_template(chat_template)
    lines = [f"FROM ./{gguf_name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    for stop in dict.fromkeys(stops + ([eos] if eos else [])):
        lines.append(f'PARAMETER stop "{stop}"')
    path = directory / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
