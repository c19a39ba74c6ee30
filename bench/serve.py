"""`lorakit serve --api` under load, on loopback: SmolLM2-135M-Instruct with three LoRA adapters (r=16 on the seven
projections, random B), chat requests spread over the base and the adapters, DialogSum dialogues cut to 64-256
tokens as prompts, 64 new tokens (greedy), streamed.

    python bench/serve.py [--levels 1,4,16] [--rounds 3] [--soak 1000] [--dtype bf16 --out ...serve-bf16.json]
For each level of concurrent clients: throughput (completion tokens/s), p50 / p95 time to first token and request
latency; the 1-client level is like requests served one at a time. With --rounds N the levels take turns N times
(the order reversed every other round) and each level's ratio to one at a time is taken within its round, the median
reported: the box's speed drifts by 10-15% over minutes, more than the ratios differ. Each level (and the warm-up)
has dialogues of its own, so that the server's prefix cache finds only what real traffic shares (the chat template's
system prompt), not a prompt seen at an earlier level; the prompt tokens it took from the cache are recorded. Where
llama.cpp's server is installed (`make llama-cpp`), it serves a merged GGUF export of one adapter as the single-
adapter anchor. Then a soak: --soak requests, 10% malformed, 5% from clients that leave mid-stream: no 5xx, every
good request answered in full, the server's RSS after within 5% of its RSS after warm-up (the largest level once,
twice as many requests as clients: the steps at every row count, a dozen prompts' prefills). Writes
bench/results/serve.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import PROJECTIONS, machine  # noqa: E402

DIALOGSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum"
SPLITS = ("dialogsum.test.jsonl", "dialogsum.dev.jsonl")  # 400 + 500 dialogues, in this order
ADAPTERS = ("a1", "a2", "a3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_random_adapters(model) -> None:
    """Three random r=16 adapters (ADAPTERS) on SmolLM2, B random so that each changes the replies."""
    import torch

    from lorakit import LoRAConfig, add_lora
    for i, name in enumerate(ADAPTERS):
        add_lora(model, LoRAConfig(r=16, alpha=32, targets=PROJECTIONS), name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_B.{name}" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def make_adapters(folder: Path) -> list[Path]:
    """add_random_adapters' three, saved as runs would be."""
    from lorakit import load_model, save_adapter
    model, _ = load_model("smollm2", "instruct")
    add_random_adapters(model)
    return [save_adapter(model, folder / name / "adapter", adapter=name,
                         metadata={"task": "chat", "model": "smollm2", "template": "chat"}) for name in ADAPTERS]


def prompts(n: int, seed: int = 0) -> list[str]:
    """DialogSum dialogues cut to 64-256 SmolLM2 tokens, asked to be summarised."""
    from lorakit.models.loading import load_tokenizer, resolve_spec
    tok = load_tokenizer(resolve_spec("smollm2")[0])
    rng = random.Random(seed)
    out = []
    lines = [line for split in SPLITS for line in (DIALOGSUM / split).read_text().splitlines()]
    if n > len(lines):
        raise SystemExit(f"bench/serve.py needs {n} dialogues; {DIALOGSUM} has {len(lines)}: fewer --rounds")
    for line in lines[:n]:
        ids = tok(json.loads(line)["dialogue"], add_special_tokens=False)["input_ids"]
        out.append("Summarize this dialogue.\n\n" + tok.decode(ids[:rng.randint(64, 256)]))
    return out


def start_server(command: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start a server and wait until it answers /v1/models; stopped again if it does not come up."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "2"})
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    proc.wait()
    raise SystemExit(f"the server did not come up: {log.read_text()[-2000:]}")


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request: time to first token, latency, tokens, finish reason."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, pieces, finish, text, used = None, 0, 0, None, "", {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]
                tokens = used["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece and first is None:
                    first = time.perf_counter() - t0
                pieces += bool(piece)
                text += piece or ""
                finish = choice.get("finish_reason") or finish
    return {"status": 200, "ttft": first or time.perf_counter() - t0, "latency": time.perf_counter() - t0,
            "tokens": tokens or pieces, "finish": finish, "text": text,  # no usage chunk: a piece a token
            "prompt_tokens": used.get("prompt_tokens", 0),
            "cached_tokens": (used.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def level(url: str, clients: int, jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    """`clients` clients taking the jobs (model, prompt) in turn, each sending its next request when its last one
    ends; throughput and latency percentiles. The clients share one asyncio loop (as vLLM's benchmark_serving runs
    its clients), so that the load generator takes as little of the box's cores from the server as it can."""
    async def run() -> list[dict]:
        results: list[dict] = [{}] * len(jobs)
        taken = iter(range(len(jobs)))
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:
            async def client_loop() -> None:
                for i in taken:
                    results[i] = await one(client, url, jobs[i][0], jobs[i][1], max_tokens)
            await asyncio.gather(*(client_loop() for _ in range(clients)))
        return results

    t0 = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]

    def pct(key, q):
        values = sorted(r[key] for r in ok)
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"clients": clients, "requests": len(jobs), "ok": len(ok), "seconds": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct("ttft", 0.5),
            "ttft_p95": pct("ttft", 0.95), "latency_p50": pct("latency", 0.5), "latency_p95": pct("latency", 0.95),
            "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "cached_tokens": sum(r["cached_tokens"] for r in ok)}


def jobs_at(clients: int, requests: int) -> int:
    """How many requests a level sends: a quarter of them one at a time, all of them (at least one a client) else."""
    return max(clients, requests // 4 if clients == 1 else requests)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(url: str, pid: int, n: int, rng: random.Random) -> dict:
    """n requests, 10% malformed, 5% left mid-stream by their client, 4 at a time."""
    kinds = ["bad"] * (n // 10) + ["leave"] * (n // 20)
    kinds += ["good"] * (n - len(kinds))
    rng.shuffle(kinds)
    models = ["smollm2", *ADAPTERS]

    def run(i_kind):
        i, kind = i_kind
        model = models[i % 4]
        if kind == "bad":
            body = rng.choice([b'{"model": ', b'{"model": "nonesuch", "messages": []}',
                               json.dumps({"model": model, "messages": "hi"}).encode(),
                               json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                           "temperature": 9}).encode()])
            r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                           timeout=60)
            return {"kind": kind, "status": r.status_code}
        body = {"model": model, "messages": [{"role": "user", "content": f"Count to {i % 7 + 3}."}],
                "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if kind == "leave" and line.startswith("data: {"):
                    break
            return {"kind": kind, "status": response.status_code, "done": "data: [DONE]" in lines}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, enumerate(kinds)))
    return {"requests": n, "malformed": kinds.count("bad"), "left": kinds.count("leave"),
            "server_errors": sum(r["status"] >= 500 for r in results),
            "bad_answered_4xx": sum(400 <= r["status"] < 500 for r in results if r["kind"] == "bad"),
            "good_complete": sum(r["status"] == 200 and r["done"] for r in results if r["kind"] == "good"),
            "good": kinds.count("good")}


def llama_cpp_anchor(folder: Path, adapter: Path, level_jobs: dict[int, list], max_tokens: int) -> list[dict] | None:
    """llama.cpp's server on a merged f16 GGUF of one adapter, where its server extra is installed."""
    try:
        import llama_cpp.server.app  # noqa: F401 - the server's own dependencies (make llama-cpp installs them)
    except ImportError as error:
        print(f"llama.cpp server anchor skipped ({error})", file=sys.stderr)
        return None
    gguf = folder / "merged.gguf"
    subprocess.run([sys.executable, "-m", "lorakit", "export", str(adapter), "--quant", "f16", "--out", str(gguf)],
                   check=True)
    port = free_port()
    proc = start_server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                         "--n_threads", "2", "--n_ctx", "4096", "--model_alias", "a1",
                         "--interrupt_requests", "False"],  # else each new request cuts off the one running
                        port, folder / "llama.log")
    try:
        return [level(f"http://127.0.0.1:{port}", c, [("a1", p) for _, p in jobs], max_tokens)
                for c, jobs in level_jobs.items()]
    finally:
        proc.terminate()
        proc.wait()


def within_rounds(rows: list[dict]) -> dict[int, tuple[float, list[float]]]:
    """Each row's tokens/s over its round's 1-client level (`x_one_at_a_time`, set on the rows); per level, the
    median over the rounds and the rounds' own ratios."""
    alone = {r["round"]: r["tokens_per_s"] for r in rows if r["clients"] == 1}
    ratios: dict[int, list[float]] = {}
    for r in rows:
        r["x_one_at_a_time"] = r["tokens_per_s"] / alone[r["round"]] if r["round"] in alone else None
        if r["x_one_at_a_time"] is not None:
            ratios.setdefault(r["clients"], []).append(r["x_one_at_a_time"])
    return {c: (sorted(v)[len(v) // 2], v) for c, v in ratios.items()}


def table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n{'round':>5} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'p95':>6} {'latency p50':>12} "
          f"{'p95':>6} {'prompt cached':>14}")
    for r in rows:
        print(f"{r.get('round', 1):>5} {r['clients']:>7} {r['tokens_per_s']:>9.1f} {r['ttft_p50']:>9.2f} "
              f"{r['ttft_p95']:>6.2f} {r['latency_p50']:>12.2f} {r['latency_p95']:>6.2f} "
              f"{r['cached_tokens'] / max(1, r['prompt_tokens']):>14.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (the 1-client level: a quarter)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="the levels taking turns this many times (see above)")
    ap.add_argument("--soak", type=int, default=1000)
    ap.add_argument("--dtype", default="fp32", help="the server's --dtype (fp32, bf16, auto)")
    ap.add_argument("--no-anchor", action="store_true", help="leave out llama.cpp's server")
    ap.add_argument("--prefix-cache-mb", help="the server's --prefix-cache-mb (0: no prefix cache)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "serve.json"))
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        adapters = make_adapters(folder)
        port = free_port()
        proc = start_server([sys.executable, "-m", "lorakit", "serve", "--api", *map(str, adapters), "--model",
                             "smollm2", "--port", str(port), "--slots", "16", "--max-queue", "256", "--dtype", a.dtype,
                             *(["--prefix-cache-mb", a.prefix_cache_mb] if a.prefix_cache_mb else [])],
                            port, folder / "server.log")
        url = f"http://127.0.0.1:{port}"
        try:
            models = ["smollm2", *ADAPTERS]
            warm = 2 * max(levels)  # warm-up: every slot in use twice over, prompts of its own
            texts = prompts(warm + a.rounds * sum(jobs_at(c, a.requests) for c in levels))
            jobs = [(models[i % 4], text) for i, text in enumerate(texts)]
            level(url, max(levels), jobs[:warm], a.max_tokens)
            time.sleep(1)
            warm_rss = rss_mb(proc.pid)
            rows, level_jobs, taken = [], {}, warm
            for r in range(a.rounds):
                for c in (levels if r % 2 == 0 else levels[::-1]):
                    count = jobs_at(c, a.requests)
                    level_jobs.setdefault(c, jobs[taken:taken + count])  # the first round's, for the anchor
                    rows.append({"round": r + 1} | level(url, c, jobs[taken:taken + count], a.max_tokens))
                    taken += count
                    print(json.dumps(rows[-1]), flush=True)
            time.sleep(1)  # the engine idle, its free memory given back (inference/native_memory.py)
            levels_rss = rss_mb(proc.pid)
            soaked = soak(url, proc.pid, a.soak, rng) if a.soak else {}
            time.sleep(1)
            soaked["rss_after_warmup_mb"], soaked["rss_after_mb"] = warm_rss, rss_mb(proc.pid)
            soaked["rss_after_levels_mb"] = levels_rss  # the soak's own growth: rss_after_mb against this
            print(json.dumps(soaked), flush=True)
        finally:
            proc.terminate()
            proc.wait()
        anchor = None if a.no_anchor else llama_cpp_anchor(folder, adapters[0], level_jobs, a.max_tokens)
    ratios = within_rounds(rows)
    table(f"lorakit serve --api --dtype {a.dtype}, the base and 3 adapters", rows)
    print("x one at a time, median of the rounds (each round's):",
          ", ".join(f"{c} clients {m:.2f}x ({', '.join(f'{x:.2f}' for x in each)})" for c, (m, each) in ratios.items()))
    if anchor:
        table("llama.cpp server (llama-cpp-python), one merged adapter (f16 GGUF)", anchor)
    result = {"levels": rows, "x_one_at_a_time_median": {c: m for c, (m, _) in ratios.items()}, "soak": soaked,
              "llama_cpp": anchor, "max_tokens": a.max_tokens}
    args = argparse.Namespace(**vars(a) | {"out": a.out})
    machine("serve", args, [result])


if __name__ == "__main__":
    main()
