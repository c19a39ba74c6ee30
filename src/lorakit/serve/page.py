"""The web page (Gradio): base and adapted answers side by side, streaming, with the adapters' run summaries. For a
chat adapter each column is a conversation of its own (the base's and each adapter's), continued turn by turn.

Gradio over Streamlit: a generator handler streams into several output boxes of one page (Streamlit reruns the whole
script per interaction and writes one stream at a time), events are plain Python functions we test directly, and
the same page runs in a real browser for the end-to-end test.
"""
from __future__ import annotations

import hmac
from typing import Iterator

from ..errors import UserError
from ..inference import Sampling
from .workbench import BASE, Workbench

ADAPTER_SLOTS = 3  # answer columns beside the base's; more adapters can be loaded, three are shown at a time
CSS = ".answer textarea {font-size: 0.95rem} #status {min-height: 1.5em} .stats {color: #666; font-size: 0.85rem}"


def _error(e: Exception) -> str:
    return f"⚠️ **{type(e).__name__}**: {e}" if not isinstance(e, UserError) else f"⚠️ {e}"


def column_updates(wb: Workbench, selected: list[str]) -> list:
    """Titles and visibility of the adapter columns for the adapters ticked (at most ADAPTER_SLOTS)."""
    import gradio as gr
    shown = list(selected)[:ADAPTER_SLOTS]
    updates = []
    for i in range(ADAPTER_SLOTS):
        name = shown[i] if i < len(shown) else None
        updates.append(gr.update(visible=name is not None))
        updates.append(f"#### {name}" if name else "")
    return updates


def _sampling(temperature: float, top_p: float, top_k: float, max_new_tokens: float, seed: float) -> Sampling:
    return Sampling(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                    top_k=int(top_k), seed=int(seed))


def run_generation(wb: Workbench, instruction: str, temperature: float, top_p: float, top_k: float,
                   max_new_tokens: float, seed: float, selected: list[str]) -> Iterator[list[str]]:
    """Stream the base's answer, then each ticked adapter's, into [status, text0, stats0, text1, stats1, ...].
    Columns run one after another on the one model, so each column's time and tokens/s are its own."""
    columns = [BASE] + list(selected)[:ADAPTER_SLOTS]
    values = [""] * (1 + 2 * (1 + ADAPTER_SLOTS))
    if len(selected) > ADAPTER_SLOTS:
        values[0] = f"showing the first {ADAPTER_SLOTS} of {len(selected)} ticked adapters"
    sampling = _sampling(temperature, top_p, top_k, max_new_tokens, seed)
    for i, column in enumerate(columns):
        try:
            for answer in wb.answer(column, instruction, sampling):
                values[1 + 2 * i], values[2 + 2 * i] = answer.text, answer.stats
                yield list(values)
        except Exception as e:  # shown on the page; the server stays up
            values[0] = _error(e)
            yield list(values)
            return


def run_chat(wb: Workbench, message: str, histories: dict | None, temperature: float, top_p: float, top_k: float,
             max_new_tokens: float, seed: float, selected: list[str]) -> Iterator[list]:
    """Send `message` to the base and to each ticked adapter, each continuing its own conversation (histories:
    {column: messages}); stream the replies into [status, message box, histories, chat0, stats0, chat1, ...]."""
    columns = [BASE] + list(selected)[:ADAPTER_SLOTS]
    histories = {name: list(turns) for name, turns in (histories or {}).items()}
    status, boxes = "", [None] * (2 * (1 + ADAPTER_SLOTS))
    for i, column in enumerate(columns):
        boxes[2 * i], boxes[2 * i + 1] = histories.get(column, []), ""
    if not message.strip():
        yield [_error(UserError("type a message first")), message, histories, *boxes]
        return
    sampling = _sampling(temperature, top_p, top_k, max_new_tokens, seed)
    for i, column in enumerate(columns):
        asked = histories.get(column, []) + [{"role": "user", "content": message}]
        try:
            for answer in wb.reply(column, asked, sampling):
                histories[column] = asked + [{"role": "assistant", "content": answer.text}]
                boxes[2 * i], boxes[2 * i + 1] = histories[column], answer.stats
                yield [status, "", histories, *boxes]
        except Exception as e:  # shown on the page; the server stays up
            yield [_error(e), message, histories, *boxes]
            return


def slot_conversations(selected: list[str], histories: dict) -> list[list[dict]]:
    """The conversation each adapter column shows once the ticked adapters change: that adapter's own, kept."""
    shown = list(selected)[:ADAPTER_SLOTS]
    return [histories.get(shown[i], []) if i < len(shown) else [] for i in range(ADAPTER_SLOTS)]


def run_classification(wb: Workbench, text: str, selected: list[str]) -> list:
    """[status, probabilities of the base, of each shown adapter] for the page's Label boxes."""
    columns = [BASE] + list(selected)[:ADAPTER_SLOTS]
    out: list = [""] + [None] * (1 + ADAPTER_SLOTS)
    try:
        for i, column in enumerate(columns):
            out[1 + i] = wb.classify(column, text)
    except Exception as e:
        out[0] = _error(e)
    return out


def load_adapter(wb: Workbench, path: str, selected: list[str]) -> list:
    """Load an adapter from the path typed on the page: [status, checkbox update, summary-choice update]."""
    import gradio as gr
    try:
        name = wb.add(path)
    except Exception as e:  # a bad directory or another base's adapter: say so, keep serving
        return [_error(e), gr.update(), gr.update()]
    names = list(wb.adapters)
    ticked = [n for n in selected if n in names] + [name]
    return [f"✅ loaded **{name}** from `{wb.adapters[name].path}`", gr.update(choices=names, value=ticked),
            gr.update(choices=names, value=name)]


def _sampling_controls() -> list:
    """temperature, top_p, top_k, max new tokens and seed, in a closed accordion."""
    import gradio as gr
    with gr.Accordion("sampling", open=False):
        with gr.Row():
            return [gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)"),
                    gr.Slider(0.05, 1, value=0.95, step=0.05, label="top_p"),
                    gr.Slider(0, 200, value=50, step=1, label="top_k (0: off)"),
                    gr.Slider(1, 1024, value=128, step=1, label="max new tokens"),
                    gr.Number(value=42, precision=0, label="seed")]


def _answer_columns(selected: list[str], task: str) -> tuple[list, list, list]:
    """(answer boxes, column titles, columns): the base's column and ADAPTER_SLOTS adapter columns, each a chat with
    its stats line, an answer box with its stats line, or a label box, as the task wants."""
    import gradio as gr
    boxes, titles, columns = [], [], []
    with gr.Row(equal_height=False):
        for i in range(1 + ADAPTER_SLOTS):
            name = BASE if i == 0 else (selected[i - 1] if i - 1 < len(selected) else None)
            with gr.Column(visible=name is not None, elem_id=f"column-{i}") as col:
                titles.append(gr.Markdown(f"#### {name or ''}" if i else "#### base (adapters off)"))
                if task == "chat":
                    boxes.append(gr.Chatbot(label="conversation", height=360, elem_id=f"answer-{i}", buttons=["copy"]))
                elif task != "classify":
                    boxes.append(gr.Textbox(label="answer", lines=10, interactive=False, elem_id=f"answer-{i}",
                                            elem_classes="answer", buttons=["copy"]))
                else:
                    boxes.append(gr.Label(label="probabilities", elem_id=f"answer-{i}"))
                if task != "classify":
                    boxes.append(gr.Markdown("", elem_id=f"stats-{i}", elem_classes="stats"))
            columns.append(col)
    return boxes, titles, columns


def build_page(wb: Workbench, selected: list[str] | None = None):
    """The Gradio Blocks for `wb`: generation columns for instruct/summarize, label boxes for classify."""
    import gradio as gr
    names = list(wb.adapters)
    selected = names[:ADAPTER_SLOTS] if selected is None else selected
    with gr.Blocks(title="lorakit: base vs adapted", analytics_enabled=False) as page:
        gr.Markdown(f"## lorakit · base `{wb.spec}` · task {wb.task}\nOne base model in memory; adapters are switched "
                    "on it, never reloaded. Tick the adapters to compare with the base.")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            chosen = gr.CheckboxGroup(names, value=selected, label="compare with", elem_id="chosen", scale=3)
            path = gr.Textbox(label="load another adapter (directory)", placeholder="runs/alpaca/adapter",
                              elem_id="adapter-path", scale=3)
            load = gr.Button("Load", elem_id="load-adapter", scale=1)
        generating, chatting = wb.task != "classify", wb.task == "chat"
        with gr.Row():
            prompt = gr.Textbox(label="message" if chatting else "instruction" if generating else "text to classify",
                                lines=3, elem_id="instruction", scale=4)
            go = gr.Button("Send" if chatting else "Generate" if generating else "Classify", variant="primary",
                           elem_id="generate", scale=1)
            if chatting:
                clear = gr.Button("New conversation", elem_id="clear", scale=1)
                histories = gr.State({})
        sampling = _sampling_controls() if generating else []
        boxes, titles, columns = _answer_columns(selected, wb.task)
        with gr.Accordion("adapter runs: task, data, parameters, metrics", open=True):
            which = gr.Dropdown(names, value=names[0] if names else None, label="adapter", elem_id="summary-choice")
            summary = gr.Markdown(wb.summary(names[0]) if names else "no adapter loaded", elem_id="summary")

        slot_outputs = [x for col, title in zip(columns[1:], titles[1:]) for x in (col, title)]
        chosen.change(lambda sel: column_updates(wb, sel), chosen, slot_outputs)
        which.change(lambda n: wb.summary(n) if n else "", which, summary)
        load.click(lambda p, sel: load_adapter(wb, p, sel), [path, chosen], [status, chosen, which])
        if chatting:
            def chat_handler(*args):  # a named generator: Gradio streams each yield
                yield from run_chat(wb, *args)
            go.click(chat_handler, [prompt, histories, *sampling, chosen],
                     [status, prompt, histories, *boxes])
            clear.click(lambda: [{}] + [[] if i % 2 == 0 else "" for i in range(len(boxes))], None, [histories, *boxes])
            chosen.change(slot_conversations, [chosen, histories], boxes[2::2])
        elif generating:
            def generate_handler(*args):  # a named generator: Gradio streams each yield
                yield from run_generation(wb, *args)
            go.click(generate_handler, [prompt, *sampling, chosen], [status, *boxes])
        else:
            go.click(lambda text, sel: run_classification(wb, text, sel), [prompt, chosen], [status, *boxes])
    return page


def theme():
    """System fonts only: the default theme fetches Google Fonts, which an offline machine cannot reach."""
    import gradio as gr
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Soft(font=fonts, font_mono=["ui-monospace", "monospace"])


def serve(wb: Workbench, host: str = "127.0.0.1", port: int = 7860, block: bool = True, key: str | None = None):
    """Start the page on host:port (127.0.0.1 by default: only this machine can reach it); with `key`, a login
    whose password is the key (any user name). Returns the Blocks."""
    page = build_page(wb)
    page.queue(default_concurrency_limit=1)  # one model: requests take turns
    auth = (lambda user, password: hmac.compare_digest(password.encode(), key.encode())) if key else None
    engine = wb.page_engine() if block else None  # made before the page takes requests; run on this thread below
    page.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False, quiet=not block,
                show_error=True, ssr_mode=False, theme=theme(), css=CSS, auth=auth,
                auth_message="lorakit: any user name; the password is the server's key (--api-key)")
    if block:  # generation on the main thread, where PyTorch computes fastest (see Engine.run)
        try:
            engine.run() if engine is not None else page.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            page.close()
            if engine is not None:
                engine.close()
    return page
