"""Where a serving engine's time goes: the engine alone (no HTTP), clients over the base and 3 adapters.

bench/serve.py measures the server from outside; this runs lorakit's Engine in-process with the same load (SmolLM2,
three random r=16 adapters, DialogSum prompts of 64-256 tokens in the model's chat template, 64 new tokens, greedy,
requests spread over the base and the adapters, each client sending its next request when the last one ends) and
times the engine's own pieces: its decode steps (by the rows computed) and its prefills (by how many prompts went
together, their tokens and padding). Compared levels run one after the other after a warm-up at the largest.
Writes bench/results/serve-engine.json.

    python bench/serve_engine.py [--levels 1,16] [--requests 64] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from serve import ADAPTERS, add_random_adapters, prompts  # noqa: E402
from step import machine  # noqa: E402


class Timed:
    """The engine's steps and prefills, timed as it runs them (wrapping its own methods)."""

    def __init__(self, engine) -> None:
        self.engine, self.steps, self.prefills = engine, [], []
        step, prefill = engine._step, engine._prefill

        def timed_step():
            rows = max(s for s, r in enumerate(engine.running) if r is not None) + 1
            start = time.perf_counter()
            step()
            self.steps.append((rows, time.perf_counter() - start))

        def timed_prefill(slots, requests, known):
            start = time.perf_counter()
            out = prefill(slots, requests, known)
            lengths = [len(r.prompt_ids) - running.cached for r, (running, _) in zip(requests, out)]
            self.prefills.append((len(requests), sum(lengths), max(lengths) * len(lengths),
                                  time.perf_counter() - start))
            return out

        engine._step, engine._prefill = timed_step, timed_prefill

    def summary(self, seconds: float, tokens: int) -> dict:
        step_s, prefill_s = sum(t for _, t in self.steps), sum(p[3] for p in self.prefills)
        by_rows = defaultdict(list)
        for rows, t in self.steps:
            by_rows[rows].append(t)
        prompt_tokens = sum(p[1] for p in self.prefills)
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                "steps": len(self.steps), "step_seconds": step_s, "prefills": len(self.prefills),
                "prefill_seconds": prefill_s, "prefill_prompts": sum(p[0] for p in self.prefills),
                "prefill_tokens": prompt_tokens, "prefill_padded_tokens": sum(p[2] for p in self.prefills),
                "prefill_ms_per_token": 1e3 * prefill_s / max(prompt_tokens, 1),
                "step_ms_by_rows": {rows: 1e3 * statistics.median(t) for rows, t in sorted(by_rows.items())}}


def clients_run(engine, ids: list[list[int]], jobs: list[int], clients: int, max_tokens: int) -> tuple[float, int]:
    """`clients` threads, each sending its share of `jobs` one after another; (seconds, tokens made)."""
    from lorakit.inference.engine import Request
    from lorakit.inference.sampling import Sampling
    made: list[int] = []

    def client(mine: list[int]) -> None:
        for j in mine:
            done, tokens = threading.Event(), []

            def emit(event, done=done, tokens=tokens):
                if event.finish_reason:
                    tokens.append(event.completion_tokens or 0)
                    done.set()
            engine.submit(Request(ids[j], ([None, *ADAPTERS])[j % 4], Sampling(max_new_tokens=max_tokens), emit))
            done.wait()
            made.extend(tokens)

    threads = [threading.Thread(target=client, args=(jobs[c::clients],)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, sum(made)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,16")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (the 1-client level: a quarter)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-engine.json"))
    a = ap.parse_args()
    from lorakit import load_model
    from lorakit.inference.engine import Engine
    from lorakit.inference.precision import cast_for_inference
    levels = [int(x) for x in a.levels.split(",")]
    model, tok = load_model("smollm2", "instruct")
    add_random_adapters(model)
    cast_for_inference(model, a.dtype)
    counts = [a.requests // 4 if c == 1 else a.requests for c in levels]
    warm = 2 * max(levels)
    texts = prompts(warm + sum(counts))
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] for t in texts]
    engine = Engine(model, tok, slots=16, max_len=1024, max_queue=256)
    timed, results = Timed(engine), []

    def drive() -> None:
        try:
            clients_run(engine, ids, list(range(warm)), max(levels), a.max_tokens)
            taken = warm
            for clients, count in zip(levels, counts):
                timed.steps.clear()
                timed.prefills.clear()
                seconds, tokens = clients_run(engine, ids, list(range(taken, taken + count)), clients, a.max_tokens)
                taken += count
                results.append({"clients": clients, "requests": count} | timed.summary(seconds, tokens))
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in results[-1].items()}, flush=True)
        finally:
            engine.close()

    driver = threading.Thread(target=drive)
    driver.start()
    engine.run()  # on the main thread, as `lorakit serve` runs it
    driver.join()
    for r in results:
        print(f"{r['clients']:>2} clients: {r['tokens_per_s']:.1f} tokens/s; steps {r['step_seconds']:.1f} s "
              f"({r['steps']}), prefills {r['prefill_seconds']:.1f} s ({r['prefill_prompts']} prompts in "
              f"{r['prefills']}, {r['prefill_ms_per_token']:.2f} ms a token, "
              f"{r['prefill_padded_tokens'] - r['prefill_tokens']} padding), of {r['seconds']:.1f} s")
    machine("serve-engine", a, results)


if __name__ == "__main__":
    main()
