"""The model's chat template: which one (the tokenizer's own, or ChatML), rendering messages with it, and where each
assistant turn lies in the rendered text, so the loss can cover exactly those characters' tokens.

Where a turn lies is found by rendering: the conversation up to and including assistant turn i renders to a prefix
of the whole conversation, and that prefix ends with the turn's content followed by its end-of-turn marker
(`<|im_end|>`, `<|eot_id|>`, `</s>`, ...) and perhaps a newline. The trained span is the content plus the marker;
the role header before it and the whitespace after it are not trained. This needs no template-specific code and no
`{% generation %}` tags, so any template that renders turns in order works.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError

# ChatML, as SmolLM2 and Qwen2 write it (without their default system prompts): the fallback for a tokenizer that has
# no template of its own, and `template: chatml` (config.TEMPLATES).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def template_text(tokenizer, template: str = "chat") -> tuple[str, str | None]:
    """(the Jinja chat template to use, a note when it is not what was asked for)."""
    if template == "chatml":
        return CHATML, None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if own:
        return own, None
    return CHATML, "the tokenizer has no chat template: ChatML used (choose with template: chat or chatml)"


def render(tokenizer, messages: list[dict], template: str = "chat", add_generation_prompt: bool = False) -> str:
    """The messages as one text in the chat template; a template that refuses them is a DataError saying why."""
    text, _ = template_text(tokenizer, template)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=text, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError and the template's own raise_exception(...)
        raise DataError(f"the chat template failed to render this conversation ({type(e).__name__}: {e})",
                        reason="template failed to render") from None


def render_chat(tokenizer, messages: list[dict], template: str = "chat",
                add_generation_prompt: bool = False) -> tuple[str, list[dict]]:
    """(the text, the messages as rendered). A template without a system role (Mistral's) gets the system prompt at
    the head of the first user turn instead."""
    try:
        return render(tokenizer, messages, template, add_generation_prompt), messages
    except DataError:
        if not (len(messages) > 1 and messages[0]["role"] == "system"):
            raise
    system, first = messages[0], messages[1]
    folded = [{**first, "content": f"{system['content']}\n\n{first['content']}"}] + messages[2:]
    return render(tokenizer, folded, template, add_generation_prompt), folded


@dataclass
class RenderedChat:
    """A conversation in its template: the text, the character spans to train on (content + end-of-turn marker of
    each trained assistant turn, in order), and whether the system prompt had to be folded into the first turn."""

    text: str
    spans: list[tuple[int, int]]
    folded_system: bool = False


def render_with_spans(tokenizer, messages: list[dict], trained: list[int], template: str = "chat") -> RenderedChat:
    """Render `messages` and find the span of each assistant turn whose index is in `trained`."""
    text, as_rendered = render_chat(tokenizer, messages, template)
    folded = as_rendered is not messages
    messages, trained = as_rendered, [i - (1 if folded else 0) for i in trained]
    spans = []
    for i in trained:
        upto = render(tokenizer, messages[:i + 1], template)
        if not text.startswith(upto):
            raise DataError(f"the chat template renders assistant turn {i} differently when later turns follow it, "
                            "so its trained tokens cannot be marked", reason="template renders turns out of order")
        content = messages[i]["content"].strip()
        start = upto.rfind(content)
        if start < 0:
            raise DataError(f"the chat template does not show assistant turn {i}'s content as written",
                            reason="template rewrites the content")
        end = start + len(content)
        spans.append((start, end + len(upto[end:].rstrip())))  # + the end-of-turn marker, not the newline after it
    return RenderedChat(text, spans, folded)


def label_tokens(tokenizer, rendered: RenderedChat) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered text, per token: does it start inside a trained span)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("conversations need a fast tokenizer (character offsets mark the trained tokens)")
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in enc["offset_mapping"]]
    trained, k = [], 0
    for start in starts:  # spans and tokens are both in order: one pass
        while k < len(rendered.spans) and start >= rendered.spans[k][1]:
            k += 1
        trained.append(k < len(rendered.spans) and start >= rendered.spans[k][0])
    return enc["input_ids"], trained
