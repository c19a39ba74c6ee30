"""Serving many requests on one model and its adapters: continuous batching across adapters.

A request is a prompt's token ids, the adapter it asks for (None: the base), its sampling settings and stop strings.
One thread owns the model and runs the decode loop's pieces (kv_cache.py, decode.py): a request waits in a bounded
queue until a slot frees, is prefilled into it together with the other waiting requests of like length (rows mixed
by adapter; each row's keys stored without its padding, so it steps as if prefilled alone; a prefix whose keys and
values an earlier prompt computed on the same adapter, such as a chat's system prompt, is copied from the prefix
cache instead of computed again: prefix_cache.py), then steps with every other
running request in one batch whose rows each use their own adapter (`adapters_by_row`: the base matmul for all
rows plus one product over the adapters' A and B side by side, each row masked to its own; or, when every running
request asks for the same adapter, that adapter alone), through the C++ step where it is built. Each row picks its
next token with its own settings from its own seeded generator. A request that ends (EOS, a stop string, max_tokens)
or whose client went away (`cancelled`) frees its slot at the next step boundary. Text comes out as it is made, held
back while it might be the start of a stop string. A request whose prefill fails hears why alone; the others go on.

Rounding: a batch's row count and the adapters beside a row change how its products round (float32: the last bits
of a logit), so a request can differ from the same request served alone where two tokens tie to those bits; in
float64 they do not (tested).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine.frozen_base import PACKED_ROWS
from .batch_adapters import BatchAdapters
from .decode import DEFER_STEPS, PREFILL_BATCH, _float_like, _left_padded, prefill_unpadded, step
from .kv_cache import KVCache
from .native_memory import release_free_memory
from .packed_prefill import prefill_packed
from .prefix_cache import PREFIX_CACHE_MB, PrefixCache
from .precision import pack_for_batches
from .sampling import Choice, Sampling


class QueueFull(Exception):
    """More requests are waiting than the engine queues (`max_queue`)."""


class Stopped(Exception):
    """The engine has stopped (or is stopping): it takes no more requests or calls."""


@dataclass
class Event:
    """What a request gets as it runs: a piece of text, and at the end its finish reason ("stop", "length"; or
    "error" with a message) and the tokens it made."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0  # tokens made so far (at the end: all of them)
    error: str = ""
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass
class Request:
    """One generation: the prompt's token ids, the adapter (None: the base), sampling, stop strings; `emit` receives
    its Events (called on the engine's thread: it must be quick and thread-safe); set `cancelled` to stop it."""

    prompt_ids: list[int]
    adapter: str | None
    sampling: Sampling
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Running:
    """A request in a slot: its choice of token, what it made, what text it has sent."""

    request: Request
    choose: Choice
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    cached: int = 0  # prompt tokens taken from the prefix cache

    @classmethod
    def seeded(cls, request: Request, device: torch.device, cached: int = 0) -> Running:
        """`request` starting, drawing from a generator of its own seeded by its `seed` (or at random)."""
        generator = torch.Generator(device)
        generator.manual_seed(request.sampling.seed if request.sampling.seed is not None else
                              int(torch.randint(0, 2 ** 62, (1,))))
        return cls(request, Choice(request.sampling, generator), cached=cached)


class Engine:
    """The serving loop over `model` (GPT-2 or the Llama family, adapters already loaded): `submit` requests from
    any thread; `call` runs a function on the model's thread between steps (loading or unloading an adapter)."""

    def __init__(self, model, tokenizer, slots: int = 16, max_len: int = 1024, max_queue: int = 64,
                 prefix_cache_mb: float = PREFIX_CACHE_MB) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len, self.max_queue = max_len, max_queue
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.like = _float_like(model)
        # steps of that many rows, and every prompt's prefill, on packed bf16 weights (given back when run ends)
        self.packed = pack_for_batches(model) if slots >= PACKED_ROWS else []
        self.cache = KVCache.for_model(model.config, slots, max_len, self.like)
        self.prefixes = PrefixCache.for_cache(self.cache, prefix_cache_mb)  # MiB for prompt prefixes (0: none)
        self.running: list[Running | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self.calls: deque[tuple[Callable, Future]] = deque()
        self.wake = threading.Condition()
        self.adapters = BatchAdapters(model, self.like.dtype)
        self.thread: threading.Thread | None = None
        self.stopping = False  # set by close, or by run as it ends: no more requests or calls
        self.deferred = 0  # turns a waiting request has been held beside a free slot (see prefill_now)
        self.worked = False  # a turn ran since memory was last given back (see _wait)

    # ---- from any thread
    def start(self) -> "Engine":
        """Run the loop on a thread of its own. A server whose main thread is free should call `run` there instead."""
        self.thread = threading.Thread(target=self.run, name="lorakit-engine", daemon=True)
        self.thread.start()
        return self

    def run(self, alive: Callable[[], bool] = lambda: True) -> None:
        """The loop on the calling thread, until `close` (from another thread) or until `alive()` is False (asked
        at least every half second while idle). `lorakit serve --api` runs it on the main thread, HTTP on another:
        libgomp gives every further thread that computes an OpenMP team of its own, far slower (docs/api.md)."""
        try:
            with torch.no_grad():
                while self._wait(alive):
                    self._turn()
        finally:
            with self.wake:
                self.stopping = True  # from now on submit and call refuse
            self._fail_all("the server is shutting down", waiting=True)
            with self.wake:
                calls, self.calls = list(self.calls), deque()
            for _, future in calls:
                future.set_exception(RuntimeError("the engine has stopped"))
            self.adapters.mix(None)  # the model as it was: no rows mixed, no packed copies
            for base in self.packed:
                base.unpack()

    def close(self) -> None:
        """Stop the loop at its next step boundary (requests still running hear why) and wait for its thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def submit(self, request: Request) -> None:
        """Queue `request`; QueueFull when `max_queue` requests are already waiting for a slot."""
        with self.wake:
            if self.stopping:
                raise Stopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot")
            self.waiting.append(request)
            self.wake.notify()

    def call(self, fn: Callable):
        """fn() on the engine's thread at a step boundary, the model as it is outside the engine (no rows mixed);
        its result or error. For loading or unloading an adapter while serving."""
        future: Future = Future()
        with self.wake:
            if self.stopping:
                raise Stopped("the server is shutting down")
            self.calls.append((fn, future))
            self.wake.notify()
        return future.result()

    def load(self) -> dict[str, int]:
        """Requests running and waiting, for /health and the bench."""
        return {"running": sum(r is not None for r in self.running), "waiting": len(self.waiting)}

    def in_use(self, adapter: str) -> int:
        return sum(r.adapter == adapter for r in [*(x.request for x in list(self.running) if x), *list(self.waiting)])

    # ---- on the engine's thread
    def _wait(self, alive: Callable[[], bool]) -> bool:
        """Sleep until there is work (False: end the loop); idle half a second after work, give back what it freed."""
        while True:
            with self.wake:
                if self.stopping or self.calls or self.waiting or any(self.running):
                    return not self.stopping
                if not alive():
                    return False
                idle = not self.wake.wait(0.5) and not (self.calls or self.waiting or self.stopping)
            if idle and self.worked:
                self.worked = False
                release_free_memory()

    def _turn(self) -> None:
        """Calls waiting for the model, then new requests into free slots, then one step of the running ones."""
        with self.wake:
            calls, self.calls = list(self.calls), deque()
        for fn, future in calls:
            self._run_call(fn, future)
        self.worked = True
        try:
            self._admit()
            if any(self.running):
                self._step()
        except Exception as error:  # noqa: BLE001 - the server keeps serving; the requests hear why
            self._fail_all(f"{type(error).__name__}: {error}")

    def _run_call(self, fn: Callable, future: Future) -> None:
        try:
            self.adapters.mix(None)  # the model as a caller expects it: no rows mixed
            future.set_result(fn())
        except Exception as error:  # noqa: BLE001 - handed to the caller
            future.set_exception(error)
        finally:  # adapters may have changed: the C++ views are rebuilt when next needed, no prefix is reused
            self.adapters.changed()
            self.prefixes.clear()

    def _admit(self) -> None:
        """Prefill waiting requests into the free slots, those with as much of their prompt in the prefix cache and
        of like length together (`prefill_groups`), when `prefill_now` says so."""
        free = [s for s, r in enumerate(self.running) if r is None]
        if not (free and self.waiting):
            return
        if not prefill_now(len(self.running) - len(free), len(self.running), len(self.waiting), len(free),
                           self.deferred):
            self.deferred += 1
            return
        self.deferred = 0
        requests: list[Request] = []
        with self.wake:
            while self.waiting and len(requests) < len(free):
                request = self.waiting.popleft()
                if not request.cancelled.is_set():
                    requests.append(request)
        groups = prefill_groups(requests, self.prefixes, packed=self.adapters.packs())
        for i, (known, group) in enumerate(groups):
            slots, free = free[:len(group)], free[len(group):]
            try:
                self._prefill_group(slots, group, known)
            except BaseException:
                with self.wake:  # the groups not reached wait again, first in line (_turn fails the running ones)
                    self.waiting.extendleft(reversed([r for _, later in groups[i + 1:] for r in later]))
                raise

    def _prefill_group(self, slots: list[int], requests: list[Request], known: int = 0) -> None:
        """Prefill `requests` together into `slots`, each on its adapter, and take their first tokens. Where that
        fails, each is prefilled alone, so that only a request that fails alone hears why. `known`: the prompts'
        first tokens whose keys and values the prefix cache holds."""
        try:
            started = self._prefill(slots, requests, known)
        except Exception as error:  # noqa: BLE001 - this request hears why; the others go on
            if len(requests) > 1:
                for slot, request in zip(slots, requests):
                    self._prefill_group([slot], [request], known)
            else:
                requests[0].emit(Event(finish_reason="error", error=f"{type(error).__name__}: {error}"))
            return
        for slot, (running, _) in zip(slots, started):
            self.running[slot] = running  # all placed first: should sending a first token fail, _fail_all reaches them
        for slot, (_, token) in zip(slots, started):
            self._took(slot, token)

    def _prefill(self, slots: list[int], requests: list[Request], known: int) -> list[tuple[Running, int]]:
        """`requests`' prompts through the model in one batch into `slots`, the first `known` tokens (fewer if pushed
        out since) from the prefix cache, their whole blocks kept there after: each a Running and first token."""
        known = min([known, *(self.prefixes.known(r.adapter, r.prompt_ids) for r in requests)])
        started = [Running.seeded(request, self.like.device, known) for request in requests]
        rows = [(r.adapter, r.prompt_ids) for r in requests]
        logits = prefill_prompts(self.model, self.cache, self.adapters, slots, rows, known, self.pad,
                                 self.prefixes.gather(rows, known) if known else None)
        for slot, (adapter, prompt) in zip(slots, rows):
            self.prefixes.keep(adapter, prompt, self.cache, slot)
        return [(running, int(running.choose(logits[b:b + 1], None)[0])) for b, running in enumerate(started)]

    def _step(self) -> None:
        """One token for every running request, the rows' adapters mixed in one batch (or one adapter for all). Only
        the slots up to the last one in use are computed (requests take the lowest free slot)."""
        running = self.running[:max(s for s, r in enumerate(self.running) if r is not None) + 1]
        cache = self.cache.narrow(len(running))
        tokens = torch.tensor([self.pad if r is None else r.ids[-1] for r in running], device=self.like.device)
        adapters = {r.request.adapter for r in running if r is not None}
        if len(adapters) == 1:
            name = adapters.pop()
            with self.adapters.alone(name):
                logits = step(self.model, cache, tokens, self.adapters.view(name))
        else:
            self.adapters.mix([r.request.adapter if r is not None else None for r in running])
            logits = step(self.model, cache, tokens, self.adapters.mixed_view())
        for s, r in enumerate(running):
            if r is None:
                cache.start[s] = cache.end[s] = 0  # an empty slot attends to nothing in the next step
            else:
                self._took(s, int(r.choose(logits[s:s + 1], None)[0]))

    def _took(self, slot: int, token: int) -> None:
        """Record slot's new token, send the text it completes, and free the slot when the request ends."""
        r = self.running[slot]
        if r.request.cancelled.is_set() or took(r, token, self.tokenizer, self.eos, self.max_len):
            self.running[slot] = None

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        """End every running request (and with `waiting`, every queued one) with an error event."""
        running, self.running[:] = list(filter(None, self.running)), [None] * len(self.running)
        for r in running:
            r.request.emit(Event(finish_reason="error", error=message))
        with self.wake:
            queued, self.waiting = (list(self.waiting), deque()) if waiting else ([], self.waiting)
        for request in queued:
            request.emit(Event(finish_reason="error", error=message))


def prefill_prompts(model, cache: KVCache, adapters: BatchAdapters, slots: list[int],
                    rows: list[tuple[str | None, list[int]]], known: int, pad: int,
                    past: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Prefill rows (adapter, prompt ids) into `slots`, their first `known` tokens' keys and values `past` (or
    none): as one packed row where the model packs, else left-padded with rows mixed by adapter; the last logits."""
    names, prompts = [adapter for adapter, _ in rows], [ids[known:] for _, ids in rows]
    if adapters.packs():
        with adapters.by_span(names, [len(p) for p in prompts]):
            return prefill_packed(model, cache, slots, prompts, past)
    with adapters.by_row(names):
        return prefill_unpadded(model, cache, slots, *_left_padded(prompts, pad, cache.keys.device), past)


def prefill_now(running: int, slots: int, waiting: int, free: int, deferred: int) -> bool:
    """Whether to prefill the waiting requests now. A prefill of one prompt costs most of what a prefill of a few
    costs on CPU (the same weights read, the same calls), so while at least half the slots are decoding, waiting
    requests are held (as TGI's router holds them) until PREFILL_BATCH can go together or they have been held
    DEFER_STEPS steps; with fewer running, each is prefilled as it comes."""
    return running * 2 < slots or min(waiting, free) >= PREFILL_BATCH or deferred >= DEFER_STEPS


PREFILL_TOKENS = 4096  # a batched prefill's tokens at most, padding counted (its activations' memory)
PREFILL_PAD_TOKENS = 128  # padding worth one prefill call less: about what a call costs beyond its tokens on CPU


def prefill_groups(requests: list[Request], prefixes: PrefixCache, packed: bool = False
                   ) -> list[tuple[int, list[Request]]]:
    """`requests` in groups to prefill together, each with how many of its prompts' first tokens the prefix cache
    holds: those with as many cached, by the length of the rest (`length_groups`), or with `packed` (prompts laid end
    to end, no padding) by adapter (`packed_groups`)."""
    by_known: dict[int, list[Request]] = {}
    for request in requests:
        by_known.setdefault(prefixes.known(request.adapter, request.prompt_ids), []).append(request)
    return [(known, group) for known, same in by_known.items()
            for group in (packed_groups(same) if packed else length_groups(same, known))]


def packed_groups(requests: list[Request], tokens: int = PREFILL_TOKENS) -> list[list[Request]]:
    """`requests` in packed rows of at most `tokens` tokens (known ones counted), each adapter's prompts side
    by side (its LoRA term then one product over them); a longer prompt goes alone."""
    groups: list[list[Request]] = [[]]
    total = 0
    for request in sorted(requests, key=lambda r: (r.adapter is not None, r.adapter or "")):
        total += len(request.prompt_ids)
        if groups[-1] and total > tokens:
            groups.append([])
            total = len(request.prompt_ids)
        groups[-1].append(request)
    return groups if groups[0] else []


def length_groups(requests: list[Request], known: int = 0, tokens: int = PREFILL_TOKENS,
                  pad: int = PREFILL_PAD_TOKENS) -> list[list[Request]]:
    """`requests` in groups to prefill together, by prompt length past their first `known` tokens: a prompt joins
    the group of those just shorter while the padding it adds to them (each is left-padded to the longest) is at most
    `pad` tokens, a prefill call saved for at most its cost, and the group stays within `tokens`, its known tokens
    counted (a longer prompt goes alone)."""
    groups: list[list[Request]] = []
    group: list[Request] = []
    longest = 0
    for request in sorted(requests, key=lambda r: len(r.prompt_ids)):
        n = len(request.prompt_ids) - known
        if group and (len(group) * (n - longest) > pad or (len(group) + 1) * (n + known) > tokens):
            groups.append(group)
            group = []
        group.append(request)
        longest = n
    return groups + [group] if group else groups


def took(r: Running, token: int, tokenizer, eos: set[int], max_len: int) -> bool:
    """Add `token` to running request r and send the text it completes (held back while it may start a stop string
    or ends inside a character); True when the request has ended (its last event sent)."""
    r.ids.append(token)
    ended = token in eos
    text = tokenizer.decode(r.ids[:-1] if ended else r.ids, skip_special_tokens=True)
    cut = min((k for k in (text.find(s) for s in r.request.stop) if k >= 0), default=-1)
    full = len(r.ids) >= r.request.sampling.max_new_tokens or len(r.request.prompt_ids) + len(r.ids) >= max_len
    if cut >= 0 or ended or full:
        text = text[:cut] if cut >= 0 else text
        r.request.emit(Event(text[r.sent:], "stop" if cut >= 0 or ended else "length", len(r.ids),
                             cached_tokens=r.cached))
        return True
    ready = len(text) - held_back(text, r.request.stop)
    if text.endswith("\ufffd"):  # a character cut between tokens: wait for its other bytes
        ready = min(ready, len(text) - 1)
    if ready > r.sent:
        r.request.emit(Event(text[r.sent:ready], completion_tokens=len(r.ids)))
        r.sent = ready
    return False


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not sent yet)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def collect(engine: Engine, request_ids: list[int], adapter: str | None, sampling: Sampling,
            stop: list[str] | None = None) -> tuple[str, str, int]:
    """Submit one request and wait for it: (text, finish reason, completion tokens). For tests and scripts."""
    events: queue.Queue = queue.Queue()
    engine.submit(Request(request_ids, adapter, sampling, events.put, list(stop or [])))
    text = ""
    while True:
        event = events.get()
        text += event.text
        if event.finish_reason:
            if event.error:
                raise RuntimeError(event.error)
            return text, event.finish_reason, event.completion_tokens
