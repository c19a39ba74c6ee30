"""What the web page drives: one base model in memory, any number of adapters on it, switched without reloading.

Kept free of the web framework so the page is a thin layer and all of this is tested directly.
"""
from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..data import format_prompt
from ..data.conversations import reply_prompt
from ..engine import delete_adapter, disable_adapters, load_adapter, read_metadata, set_adapter
from ..errors import UserError
from ..inference import Sampling, generate, stream
from ..inference.decode import supports
from ..inference.engine import Engine, Request
from ..inference.generation import prompt_ids
from ..inference.precision import cast_for_inference
from ..models import adapter_dir, foreign_base, is_seq2seq, load_model

BASE = "base"
ENGINE_LENGTH = 4096  # the context the page's engine keeps room for (prompt + reply)


def adapter_name(path: Path, taken: set[str]) -> str:
    """A name for the adapter at `path`: its run's directory name (or its own), made unique among `taken`."""
    stem = (path.parent.name if path.name == "adapter" else path.name) or "adapter"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}-{i}", i + 1
    return name


def page_task(task: str | None) -> str | None:
    """The page a run's task is shown on: a preference run (DPO and kin) is a chat model, shown as a chat."""
    return "chat" if task == "preference" else task


@dataclass
class LoadedAdapter:
    """An adapter on the shared base: where it came from, its lorakit.json, and the run's run.json/eval.json."""

    name: str
    path: Path
    meta: dict
    run: dict | None
    eval: dict | None


@dataclass
class Answer:
    """One column's answer so far, and how fast it came."""

    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    done: bool = False
    error: str = ""

    @property
    def stats(self) -> str:
        if self.error:
            return f"error: {self.error}"
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return f"{self.seconds:.2f} s · {self.tokens} tokens · {rate:.1f} tokens/s{'' if self.done else ' …'}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


class Workbench:
    """One base model plus named adapters; `answer` streams the base or one adapter, `classify` scores a text.

    A lock serialises model use: switching adapters is a change of state on the one shared model.
    """

    def __init__(self, model: str | None = None, adapters: list[str] | tuple[str, ...] = (),
                 task: str | None = None, dtype: str = "auto") -> None:
        first = read_metadata(adapter_dir(adapters[0])) if adapters else {}
        self.spec = model or first.get("model") or "smollm2"
        self.task = page_task(task or first.get("task") or "instruct")
        self.labels: list[str] = list(first.get("labels") or [])
        if self.task == "classify" and not self.labels:
            raise UserError("a classification page needs a classification adapter (its lorakit.json names the labels)")
        self.model, self.tok = load_model(self.spec, self.task, num_labels=len(self.labels) or None)
        self.model.eval()
        self.dtype = cast_for_inference(self.model, dtype)  # adapters loaded later are cast to it too
        self.template = first.get("template") or ("chat" if getattr(self.tok, "chat_template", None) else "alpaca")
        self.adapters: dict[str, LoadedAdapter] = {}
        self.lock = threading.Lock()
        self.engine: Engine | None = None  # the serving engine, one row: what generates for the page's columns
        for path in adapters:
            self.add(path)

    # adapters ------------------------------------------------------------------------------------------------
    def _name_for(self, path: Path) -> str:
        return adapter_name(path, set(self.adapters) | {BASE})

    def add(self, path: str | Path) -> str:
        """Load the adapter at `path` onto the shared base; its name. UserError (the page shows it) if it does not
        fit: not an adapter, trained on another base model or for another task, or shapes that do not match."""
        if not str(path).strip():
            raise UserError("give an adapter directory")
        p = adapter_dir(path)
        if not p.is_dir():
            raise UserError(f"{p}: no such directory")
        meta = read_metadata(p)
        base = foreign_base(p, self.spec, self.model.config._name_or_path)
        if base:
            raise UserError(f"{p}: this adapter was trained on base model {base!r}; this page serves {self.spec!r}")
        task = page_task(meta.get("task"))
        if task and task != self.task and {task, self.task} != {"instruct", "summarize"}:  # chat only with chat
            raise UserError(f"{p}: this adapter is for task {task!r}; this page serves task {self.task!r}")
        if self.task == "classify" and list(meta.get("labels") or []) != self.labels:
            raise UserError(f"{p}: labels {meta.get('labels')} differ from this page's {self.labels}")
        name = self._name_for(p)
        with self.lock:  # a head the adapter trains is its own copy: the base's and other adapters' stay as they are
            self._on_model(lambda: cast_for_inference(load_adapter(self.model, p, name, quantize=meta.get("quantize"))
                                                      .eval(), self.dtype))
        run_dir = p.parent
        self.adapters[name] = LoadedAdapter(name, p, meta, _read_json(run_dir / "run.json"),
                                            _read_json(run_dir / "eval.json"))
        return name

    def remove(self, name: str) -> None:
        with self.lock:
            self._on_model(lambda: delete_adapter(self.model, name))
        del self.adapters[name]

    def _on_model(self, change) -> None:
        """Change the model: on the engine's thread between its steps once it runs (its views are rebuilt)."""
        if self.engine is None:
            change()
        else:
            self.engine.call(change)

    @contextlib.contextmanager
    def using(self, column: str) -> Iterator[nn.Module]:
        """The model computing as `column`: the base (every adapter off) or one adapter (with its own head)."""
        self._check(column)
        with self.lock:
            if column == BASE:
                with disable_adapters(self.model):
                    yield self.model
                return
            set_adapter(self.model, column)
            yield self.model

    def _check(self, column: str) -> None:
        if column != BASE and column not in self.adapters:
            raise UserError(f"no adapter named {column!r} is loaded; loaded: {', '.join(self.adapters) or 'none'}")

    # use -----------------------------------------------------------------------------------------------------
    def template_for(self, column: str) -> str:
        self._check(column)
        return self.template if column == BASE else self.adapters[column].meta.get("template") or self.template

    def prompt_for(self, column: str, instruction: str) -> str:
        """The instruction wrapped in the column's template (the adapter's own; raw text for encoder-decoders)."""
        return instruction if is_seq2seq(self.model) else format_prompt(self.tok, instruction, "", self.template_for(column))

    def answer(self, column: str, instruction: str, sampling: Sampling) -> Iterator[Answer]:
        """Stream `column`'s answer to `instruction`: the Answer grows piece by piece, timed from the first call."""
        if not instruction.strip():
            raise UserError("type an instruction first")
        yield from self._stream(column, self.prompt_for(column, instruction), sampling)

    def reply(self, column: str, history: list[dict], sampling: Sampling) -> Iterator[Answer]:
        """Stream `column`'s next assistant turn after `history` (which ends with the user's), in the column's chat
        template: each column continues its own conversation."""
        if not history or history[-1]["role"] != "user" or not str(history[-1]["content"]).strip():
            raise UserError("type a message first")
        yield from self._stream(column, reply_prompt(self.tok, history, self.template_for(column)), sampling)

    def _stream(self, column: str, text: str, sampling: Sampling) -> Iterator[Answer]:
        template = self.template_for(column)
        ids = prompt_ids(self.tok, [text], template)[0]
        length = len(ids) + sampling.max_new_tokens
        if supports(self.model, length) and length <= ENGINE_LENGTH:
            yield from self._stream_engine(column, ids, sampling)
            return
        out, counts = Answer(), {"tokens": 0}
        with self.using(column) as model:
            t0 = time.perf_counter()
            if is_seq2seq(model):  # one piece: encoder-decoder answers are short, and counted after the fact
                pieces = iter(generate(model, self.tok, [text], sampling, template))
            else:
                pieces = stream(model, self.tok, text, sampling, template, stats=counts)
            for piece in pieces:
                out.text += piece
                out.tokens, out.seconds = counts["tokens"], time.perf_counter() - t0
                yield out
            out.text, out.seconds, out.done = out.text.strip(), time.perf_counter() - t0, True
            out.tokens = counts["tokens"] or len(self.tok(out.text, add_special_tokens=False)["input_ids"])
        yield out

    def page_engine(self) -> Engine | None:
        """The engine the page generates through, made now and not started, for a caller that runs it on the main
        thread (see Engine.run); None where the page does not generate through it (classification, or a model the
        decode loop does not drive)."""
        with self.lock:
            if self.engine is None and self.task != "classify" and supports(self.model):
                self.engine = Engine(self.model, self.tok, slots=1, max_len=ENGINE_LENGTH)
            return self.engine

    def _stream_engine(self, column: str, ids: list[int], sampling: Sampling) -> Iterator[Answer]:
        """The column's answer through the serving engine (the same engine as `lorakit serve --api`), one request at
        a time: the tokens a lone `lorakit generate` gives."""
        self._check(column)
        events: queue.Queue = queue.Queue()
        out = Answer()
        with self.lock:
            if self.engine is None:
                self.engine = Engine(self.model, self.tok, slots=1, max_len=ENGINE_LENGTH).start()
            t0 = time.perf_counter()
            request = Request(ids, None if column == BASE else column, sampling, events.put)
            self.engine.submit(request)
            try:
                while not out.done:
                    event = events.get()
                    if event.error:
                        raise UserError(f"generation failed: {event.error}")
                    out.text += event.text
                    out.tokens, out.seconds, out.done = event.completion_tokens, time.perf_counter() - t0, bool(
                        event.finish_reason)
                    if not out.done:
                        yield out
            finally:  # the page closed mid-answer: its slot is freed at the engine's next step
                request.cancelled.set()
        out.text = out.text.strip()
        yield out

    @torch.no_grad()
    def classify(self, column: str, text: str) -> dict[str, float]:
        """Class probabilities of `text` under `column` (an adapter with its head, or the base's untrained head)."""
        if self.task != "classify":
            raise UserError(f"this page serves task {self.task!r}; classification needs a classification adapter")
        if not text.strip():
            raise UserError("type a text to classify first")
        max_length = self.adapters[column].meta.get("max_length", 256) if column in self.adapters else 256
        enc = self.tok([text], return_tensors="pt", truncation=True, max_length=max_length)
        with self.using(column) as model:
            probs = model(**enc).logits.float().softmax(-1)[0]
        return {label: float(p) for label, p in zip(self.labels, probs)}

    def summary(self, name: str) -> str:
        """The adapter's run in Markdown: task, data, parameter report and metrics (from run.json and eval.json)."""
        a = self.adapters[name]
        lines = [f"### {name}", f"`{a.path}`", ""]
        m = a.meta
        lines.append(f"- **task** {m.get('task', '?')} · **base** {m.get('model', '?')} · **template** "
                     f"{m.get('template', '?')} · **method** {m.get('method', 'lora')}"
                     + (f" · **labels** {', '.join(m['labels'])}" if m.get("labels") else ""))
        if a.run is None:
            lines.append("- no run.json beside this adapter (trained elsewhere): no data, parameters or metrics")
            return "\n".join(lines) + "\n"
        cfg, params, data, timings = (a.run.get(k, {}) for k in ("config", "parameters", "data", "timings"))
        lines.append(f"- **data** {cfg.get('data', '?')}: {data.get('train_rows', '?')} train / "
                     f"{data.get('val_rows', '?')} val / {data.get('test_rows', '?')} test rows")
        if params:
            lines.append(f"- **parameters** {params.get('trainable', 0):,} trainable of {params.get('total', 0):,} "
                         f"({100 * params.get('trainable', 0) / max(params.get('total', 1), 1):.2f}%); "
                         f"r={cfg.get('r')}, alpha={cfg.get('alpha')}, targets {cfg.get('targets')}")
        run_metrics = a.run.get("metrics", {})
        if run_metrics.get("best_val_loss") is not None:
            lines.append(f"- **training** {timings.get('steps', '?')} steps, {timings.get('train_s', 0):.0f} s, "
                         f"best val loss {run_metrics['best_val_loss']:.4f} (step {run_metrics.get('best_step')})")
        if a.eval:
            lines += ["", "| model | " + " | ".join(_metric_names(a.eval)) + " |",
                      "|---|" + "---:|" * len(_metric_names(a.eval))]
            for row, values in a.eval.get("metrics", {}).items():
                lines.append(f"| {row} | " + " | ".join(_fmt(values.get(k)) for k in _metric_names(a.eval)) + " |")
        return "\n".join(lines) + "\n"


def _metric_names(ev: dict) -> list[str]:
    names: list[str] = []
    for values in ev.get("metrics", {}).values():
        names += [k for k, v in values.items() if isinstance(v, (int, float)) and k not in names]
    return names[:6]


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
