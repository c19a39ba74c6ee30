"""`lorakit serve --api` with the real `openai` client: the model list, chat and completions (streamed and not),
stop strings, seeded sampling, requests for different adapters batched together and each given the tokens that
adapter gives alone (in float64, where the batch's row count cannot change a token), errors as OpenAI's error object
with the right status, adapters loaded and unloaded at run time from under the adapter root only, a bounded queue,
a client that goes away freeing its slot."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import free_port, randomize_lora, save_tiny, tiny_llama, word_tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
PROMPTS = ["w5 w9 w12 w40", "w7 w8", "w30 w31 w32 w33 w34 w35", "w60 w61 w62", "w11 w70", "w90 w91 w92 w93",
           "w44", "w50 w51 w52"]


def tiny_served(tmp_path, slots=4, max_queue=64, max_len=64, adapters=("a", "b", "c")):
    """A float64 tiny Llama with LoRA adapters a, b, c (random B), its engine, and an adapter root holding a saved
    adapter ("extra") and a symlink that points out of it."""
    from lorakit import LoRAConfig, add_lora, save_adapter
    from lorakit.inference.engine import Engine
    from lorakit.serve.served import Served
    torch.manual_seed(0)
    model = tiny_llama().double()
    model.config._name_or_path = "tiny"
    for i, name in enumerate(adapters):
        add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), name)
        randomize_lora(model, seed=i)
    root = tmp_path / "adapters"
    spare = tiny_llama().double()
    spare.config._name_or_path = "tiny"
    add_lora(spare, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_lora(spare, seed=9)
    save_adapter(spare, root / "extra")
    save_adapter(spare, tmp_path / "outside" / "adapter")
    (root / "escape").symlink_to(tmp_path / "outside")
    model.eval()
    engine = Engine(model, word_tokenizer(), slots=slots, max_len=max_len, max_queue=max_queue).start()
    return Served(engine, "tiny", "tiny", {name: f"mem:{name}" for name in adapters}, KEY, root)


class Server:
    """uvicorn on a free loopback port in a thread, serving `served`."""

    def __init__(self, served) -> None:
        import uvicorn

        from lorakit.serve.api import build_app
        self.served, self.port = served, free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(served), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.served.engine.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_served(tmp_path_factory.mktemp("api")))
    yield s
    s.close()


def alone(served, prompt: str, adapter: str | None, max_tokens: int, chat: bool) -> str:
    """What `lorakit generate` gives for the prompt with that adapter alone (the base for None), run on the
    engine's thread between its steps."""
    return served.engine.call(lambda: generated(served, prompt, adapter, max_tokens, chat))


def generated(served, prompt: str, adapter: str | None, max_tokens: int, chat: bool) -> str:
    from lorakit import disable_adapters, set_adapter
    from lorakit.data.chat_template import render
    from lorakit.inference import Sampling, generate
    model, tok = served.engine.model, served.engine.tokenizer
    text = render(tok, [{"role": "user", "content": prompt}], "chat", add_generation_prompt=True) if chat else prompt
    template = "chat" if chat else "alpaca"
    if adapter is None:
        with disable_adapters(model):
            return generate(model, tok, [text], Sampling(max_new_tokens=max_tokens), template)[0]
    set_adapter(model, adapter)
    return generate(model, tok, [text], Sampling(max_new_tokens=max_tokens), template)[0]


def test_models_list_the_base_and_each_adapter(server):
    cards = {m.id: m for m in server.client().models.list().data}
    assert set(cards) == {"tiny", "a", "b", "c"}
    assert cards["tiny"].parent is None and cards["a"].parent == "tiny" and cards["a"].root == "mem:a"
    assert cards["tiny"].max_model_len == 64


def test_concurrent_requests_over_adapters_equal_each_adapter_alone(server):
    """Eight greedy chat requests at once, over the base and three adapters, share decode steps (four slots, rows
    mixed by adapter); each reply is what `lorakit generate` gives with its adapter alone (float64)."""
    client = server.client()
    jobs = [(prompt, [None, "a", "b", "c"][i % 4]) for i, prompt in enumerate(PROMPTS)]

    def ask(job):
        prompt, adapter = job
        reply = client.chat.completions.create(model=adapter or "tiny", max_tokens=10, temperature=0,
                                               messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    served = server.served
    for (prompt, adapter), (text, finish, used) in zip(jobs, answers):
        assert text.strip() == alone(served, prompt, adapter, 10, chat=True), (prompt, adapter)
        assert finish in ("stop", "length") and used.completion_tokens <= 10
        assert used.total_tokens == used.prompt_tokens + used.completion_tokens
    assert len({a[0] for a in answers}) > 1


def test_waiting_requests_are_prefilled_together_and_each_equals_its_adapter_alone(tmp_path):
    """Requests queued together are prefilled in one batch: a packed row, each adapter's prompts side by side (or,
    where the model does not pack, left-padded by length, rows mixed by adapter, each row's keys stored without its
    padding); each reply is what its adapter gives alone (float64). A request whose prompt cannot run fails alone:
    its batch is prefilled again one request at a time."""
    import queue

    from lorakit.inference import Sampling
    from lorakit.inference.engine import Engine, Request
    served = tiny_served(tmp_path)
    served.engine.close()
    model, tok = served.engine.model, served.engine.tokenizer

    def serve(prompts: list[list[int]], adapters: list[str | None], packed: bool = True):
        engine, batches = Engine(model, tok, slots=8, max_len=64), []
        assert engine.adapters.packs()
        engine.adapters.packed = packed
        prefill = engine._prefill
        engine._prefill = lambda slots, requests, known: batches.append([len(r.prompt_ids) for r in requests]) or (
            prefill(slots, requests, known))
        boxes = [queue.Queue() for _ in prompts]
        for ids, adapter, box in zip(prompts, adapters, boxes):
            engine.submit(Request(ids, adapter, Sampling(max_new_tokens=6), box.put))
        engine.start()
        replies = []
        for box in boxes:
            text, event = "", box.get(timeout=60)
            while not event.finish_reason:
                text, event = text + event.text, box.get(timeout=60)
            replies.append((text + event.text, event))
        engine.close()
        return replies, batches

    jobs = [(prompt, [None, "a", "b", "c"][i % 4]) for i, prompt in enumerate(PROMPTS[:7])]
    for packed, batch in ((True, [4, 2, 2, 4, 6, 1, 3]),  # the base's, a's, b's, c's prompts
                          (False, [1, 2, 2, 3, 4, 4, 6])):  # by length, padded to the longest
        replies, batches = serve([tok(p)["input_ids"] for p, _ in jobs], [a for _, a in jobs], packed)
        for (prompt, adapter), (text, _) in zip(jobs, replies):
            assert text.strip() == generated(served, prompt, adapter, 6, chat=False), (prompt, adapter, packed)
        assert batches == [batch]
    good = tok("w5 w6 w7")["input_ids"]
    replies, batches = serve([good, [5, 999, 7], good], ["a", "b", None])  # 999: past the vocabulary
    assert [r[1].finish_reason == "error" for r in replies] == [False, True, False]
    assert "IndexError" in replies[1][1].error
    assert replies[0][0].strip() == generated(served, "w5 w6 w7", "a", 6, chat=False)
    assert batches == [[3, 3, 3], [3], [3], [3]]  # the failing batch, then each of its requests alone


def test_prompts_that_share_a_prefix_reuse_its_keys_and_each_equals_its_adapter_alone(tmp_path):
    """A prompt's whole blocks of keys and values are kept per adapter; a later prompt on the same adapter that
    starts with them computes only the rest (prefilled with others that know as much, rows mixed by adapter), and
    says how many it took (cached_tokens); each reply is what its adapter gives alone (float64). Loading or unloading
    an adapter clears the cache."""
    import queue
    from concurrent.futures import Future

    from lorakit.inference import Sampling
    from lorakit.inference.engine import Engine, Request
    from lorakit.inference.prefix_cache import BLOCK
    served = tiny_served(tmp_path)
    served.engine.close()
    model, tok = served.engine.model, served.engine.tokenizer
    engine, batches = Engine(model, tok, slots=4, max_len=64), []
    prefill = engine._prefill
    engine._prefill = lambda slots, requests, known: batches.append((known, [len(r.prompt_ids) for r in requests])
                                                                     ) or prefill(slots, requests, known)
    preamble = " ".join(f"w{i}" for i in range(4, 4 + 2 * BLOCK + 3))  # two whole blocks and three tokens

    def serve(jobs: list[tuple[str, str | None]]) -> list[int]:
        """Each (suffix, adapter) after the preamble, queued together and served to the end on this thread; each
        reply checked against its adapter alone; how many prompt tokens each took from the cache."""
        boxes = [queue.Queue() for _ in jobs]
        for (suffix, adapter), box in zip(jobs, boxes):
            engine.submit(Request(tok(f"{preamble} {suffix}")["input_ids"], adapter, Sampling(max_new_tokens=6),
                                  box.put))
        with torch.no_grad():
            while engine.waiting or any(engine.running):
                engine._turn()
        engine.adapters.mix(None)  # the model as generate expects it
        cached = []
        for (suffix, adapter), box in zip(jobs, boxes):
            events = [box.get_nowait() for _ in range(box.qsize())]
            assert events[-1].finish_reason in ("stop", "length"), events[-1]
            text = "".join(e.text for e in events)
            assert text.strip() == generated(served, f"{preamble} {suffix}", adapter, 6, chat=False), (suffix, adapter)
            cached.append(events[-1].cached_tokens)
        return cached

    assert serve([("w90 w91", "a")]) == [0] and batches == [(0, [37])]
    assert len(engine.prefixes) == 2  # its two whole blocks on adapter a
    batches.clear()
    assert serve([("w92", "a"), ("w92 w93", "b"), ("w94", None), ("w95 w96 w97", "a")]) == [32, 0, 0, 32]
    assert batches == [(32, [36, 38]), (0, [36, 37])]
    batches.clear()
    assert serve([("w80", "b"), ("w81 w82", None), ("w83", "a")]) == [32, 32, 32]
    assert batches == [(32, [37, 36, 36])]  # packed: the base's, a's, b's prompt, each after its adapter's prefix
    engine._run_call(lambda: None, Future())  # as /v1/load_lora_adapter and unload do
    assert len(engine.prefixes) == 0 and serve([("w84", "a")]) == [0]
    # room for three blocks: the first group's blocks push out one that the next group was counted on
    engine.close()
    three_blocks = 3 * 2 * 2 * 2 * BLOCK * 8 * 8 / 2 ** 20  # keys and values, 2 layers, 2 kv heads, head_dim 8, float64
    engine, batches = Engine(model, tok, slots=4, max_len=64, prefix_cache_mb=three_blocks), []
    prefill = engine._prefill
    engine._prefill = lambda slots, requests, known: batches.append((known, [len(r.prompt_ids) for r in requests])
                                                                     ) or prefill(slots, requests, known)
    assert serve([("w90 w91", "a")]) == [0] and len(engine.prefixes) == 2
    assert serve([("w60 w61", "b"), ("w62", "a")]) == [0, BLOCK]  # a's second block went with b's two
    assert batches[1:] == [(0, [37]), (2 * BLOCK, [36])]


def test_the_prefix_cache_keeps_first_blocks_longest_and_can_be_off():
    """Past its capacity the least recently used blocks go, a prefix's later blocks before its first ones (useless
    without them); a block is found only after the same tokens on the same adapter; capacity 0 keeps nothing; the
    blocks live in a pool allocated up front, their places reused; a prompt longer than the pool keeps its first
    ones."""
    from lorakit.inference.kv_cache import KVCache
    from lorakit.inference.prefix_cache import BLOCK, PrefixCache
    cache = KVCache(layers=1, rows=2, kv_heads=1, length=64, head_dim=2, like=torch.zeros(0))
    cache.keys.normal_(), cache.values.normal_()
    prefixes = PrefixCache(cache, 3)
    pool = prefixes.keys.data_ptr(), prefixes.values.data_ptr()
    two_blocks_mb = 2 * 2 * BLOCK * 2 * 4 / 2 ** 20  # keys and values, 2 floats a token
    assert prefixes.keys.shape == (3, 1, 1, BLOCK, 2) and PrefixCache.for_cache(cache, two_blocks_mb).limit == 2
    first, second = list(range(3 * BLOCK)), list(range(100, 100 + 2 * BLOCK))
    prefixes.keep("a", first, cache, 0)
    assert prefixes.known("a", first) == 2 * BLOCK  # short of the last token
    assert prefixes.known("a", first + [7]) == 3 * BLOCK and prefixes.known("b", first + [7]) == 0
    assert prefixes.known("a", [1] + first) == 0
    keys, values = prefixes.gather([("a", first + [7])], 2 * BLOCK)
    assert torch.equal(keys[:, 0], cache.keys[:, 0, :, :2 * BLOCK]) and keys.shape == (1, 1, 1, 2 * BLOCK, 2)
    assert torch.equal(values[:, 0], cache.values[:, 0, :, :2 * BLOCK])
    prefixes.keep("a", second, cache, 1)  # five blocks for three: the first prompt's last two go
    assert len(prefixes) == 3 and prefixes.known("a", first + [7]) == BLOCK
    assert prefixes.known("a", second + [7]) == 2 * BLOCK
    keys, values = prefixes.gather([("a", second + [7]), ("a", [*first[:BLOCK], 1] * 2)], BLOCK)
    assert torch.equal(keys[:, 0], cache.keys[:, 1, :, :BLOCK]) and torch.equal(keys[:, 1], cache.keys[:, 0, :, :BLOCK])
    assert torch.equal(values[:, 0], cache.values[:, 1, :, :BLOCK])
    assert torch.equal(values[:, 1], cache.values[:, 0, :, :BLOCK])
    keys, values = prefixes.gather([("a", second + [7])], 2 * BLOCK)  # two blocks in order, keys and values apart
    assert torch.equal(keys[:, 0], cache.keys[:, 1, :, :2 * BLOCK])
    assert torch.equal(values[:, 0], cache.values[:, 1, :, :2 * BLOCK])
    assert (prefixes.keys.data_ptr(), prefixes.values.data_ptr()) == pool
    one = PrefixCache(cache, 1)
    one.keep("a", first, cache, 0)  # three blocks for one place
    assert len(one) == 1 and one.known("a", first + [7]) == BLOCK
    off = PrefixCache(cache, 0)
    off.keep("a", first, cache, 0)
    assert len(off) == 0 and off.known("a", first) == 0
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="give a size >= 0"):
            PrefixCache.for_cache(cache, bad)


def test_a_repeated_prefix_is_reported_as_cached_tokens(server):
    """usage.prompt_tokens_details.cached_tokens, through the real client, streamed and not."""
    client = server.client()
    prompt = " ".join(f"w{i}" for i in range(10, 30))  # 20 tokens: one whole block
    first = client.completions.create(model="c", prompt=prompt + " w40", max_tokens=3, temperature=0)
    again = client.completions.create(model="c", prompt=prompt + " w41", max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 16
    stream = client.completions.create(model="c", prompt=prompt + " w42", max_tokens=3, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    assert [c.usage.prompt_tokens_details.cached_tokens for c in stream if c.usage] == [16]


def test_length_groups_bound_padding_and_size():
    from lorakit.inference import Sampling
    from lorakit.inference.engine import Request, length_groups
    requests = [Request([1] * n, None, Sampling(), lambda e: None) for n in (100, 10, 12, 11, 90, 5000, 95)]
    groups = [[len(r.prompt_ids) for r in g] for g in length_groups(requests, tokens=250, pad=20)]
    assert groups == [[10, 11, 12], [90, 95], [100], [5000]]  # 78 tokens of padding to each of three: apart
    assert [len(g) for g in length_groups(requests[:5], tokens=4096, pad=300)] == [5]


def test_streaming_joins_to_the_whole_reply_and_completions_work_too(server):
    client = server.client()
    whole = client.chat.completions.create(model="b", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "w5 w6 w7"}])
    stream = client.chat.completions.create(model="b", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "w5 w6 w7"}])
    pieces, finish, used = [], None, None
    for chunk in stream:
        if chunk.usage:
            used = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert used.completion_tokens == whole.usage.completion_tokens
    done = client.completions.create(model="a", prompt="w20 w21 w22", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="a", prompt="w20 w21 w22",
                                                                              max_tokens=6, temperature=0, stream=True))
    assert streamed == done.choices[0].text and done.choices[0].finish_reason == "length"
    assert done.choices[0].text.strip() == alone(server.served, "w20 w21 w22", "a", 6, chat=False)


def test_stop_strings_and_seeded_sampling(server):
    client = server.client()
    full = client.completions.create(model="c", prompt="w1 w2", max_tokens=10, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[2]
    cut = client.completions.create(model="c", prompt="w1 w2", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", max_tokens=12, temperature=1.0, messages=[{"role": "user", "content": "w3 w4"}])
    first, again = (client.chat.completions.create(seed=7, **kw).choices[0].message.content for _ in range(2))
    other = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert first == again and first != other


def raw(server, path, body=None, key=KEY, content=None, headers=None):
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, content=content, headers=hdrs | (headers or {}), timeout=30)


@pytest.mark.parametrize("case, status, code", [
    ("unknown model", 404, "model_not_found"), ("bad json", 400, "bad_json"), ("no key", 401, "invalid_api_key"),
    ("wrong key", 401, "invalid_api_key"), ("too large", 413, "body_too_large"), ("n=2", 400, None),
    ("missing field", 422, None), ("prompt too long", 400, "context_length_exceeded"),
    ("image part", 400, None), ("too large, chunked", 413, "body_too_large"), ("unknown path", 404, None),
    ("wrong method", 405, None), ("empty prompt", 400, None), ("seed past 64 bits", 422, None),
    ("logprobs asked for", 400, None),
])
def test_errors_are_openai_error_objects_with_their_status(server, case, status, code):
    chat = {"model": "a", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}
    response = {
        "unknown model": lambda: raw(server, "/v1/chat/completions", chat | {"model": "nonesuch"}),
        "bad json": lambda: raw(server, "/v1/chat/completions", content=b'{"model": "a", "messages": [',
                                headers={"Content-Type": "application/json"}),
        "no key": lambda: raw(server, "/v1/chat/completions", chat, key=None),
        "wrong key": lambda: raw(server, "/v1/chat/completions", chat, key="wrong"),
        "too large": lambda: raw(server, "/v1/chat/completions", chat | {"pad": "x" * (2 << 20)}),
        "n=2": lambda: raw(server, "/v1/chat/completions", chat | {"n": 2}),
        "missing field": lambda: raw(server, "/v1/chat/completions", {"model": "a"}),
        "prompt too long": lambda: raw(server, "/v1/completions", {"model": "a", "prompt": "w5 " * 80}),
        "image part": lambda: raw(server, "/v1/chat/completions", chat | {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        "too large, chunked": lambda: raw(server, "/v1/chat/completions", content=(b"x" * (1 << 16) for _ in range(20)),
                                          headers={"Content-Type": "application/json"}),
        "unknown path": lambda: raw(server, "/v1/nonesuch", chat),
        "wrong method": lambda: httpx.get(f"{server.url}/v1/chat/completions",
                                          headers={"Authorization": f"Bearer {KEY}"}),
        "empty prompt": lambda: raw(server, "/v1/completions", {"model": "a", "prompt": ""}),
        "seed past 64 bits": lambda: raw(server, "/v1/chat/completions", chat | {"seed": 1 << 70}),
        "logprobs asked for": lambda: raw(server, "/v1/chat/completions", chat | {"logprobs": True}),
    }[case]()
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "Traceback" not in response.text
    if code:
        assert error["code"] == code
    assert server.client().models.list().data  # still serving


def test_the_real_client_raises_its_own_exceptions(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="nonesuch", messages=[{"role": "user", "content": "w5"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="a", n=3, messages=[{"role": "user", "content": "w5"}])


def test_load_and_unload_at_run_time_only_from_under_the_root(server):
    client = server.client()
    assert raw(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "extra"}).status_code == 200
    assert "x" in {m.id for m in client.models.list().data}
    reply = client.completions.create(model="x", prompt="w5 w6", max_tokens=4, temperature=0)
    assert reply.choices[0].text.strip() == alone(server.served, "w5 w6", "x", 4, chat=False)
    taken = raw(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "extra"})
    assert taken.status_code == 400 and "taken" in taken.json()["error"]["message"]
    for path in ("../outside/adapter", "/etc", "escape/adapter"):
        outside = raw(server, "/v1/load_lora_adapter", {"lora_name": "y", "lora_path": path})
        assert outside.status_code == 400 and outside.json()["error"]["code"] == "path_not_allowed", path
    assert raw(server, "/v1/load_lora_adapter", {"lora_name": "y", "lora_path": "nothing"}).status_code == 404
    assert raw(server, "/v1/unload_lora_adapter", {"lora_name": "x"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="x", prompt="w5", max_tokens=2)
    assert raw(server, "/v1/unload_lora_adapter", {"lora_name": "x"}).status_code == 404


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(tmp_path):
    server = Server(tiny_served(tmp_path, slots=1, max_queue=1, max_len=512))
    try:
        body = {"model": "a", "prompt": "w5 w6", "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: raw(server, "/v1/completions", body), range(6)))
        codes = sorted(r.status_code for r in statuses)
        assert 429 in codes and 200 in codes
        busy = next(r for r in statuses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "RateLimitError"
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body | {"stream": True},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    break  # the first piece came: leave mid-stream
        deadline = time.time() + 10
        while server.served.engine.load()["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert server.served.engine.load() == {"running": 0, "waiting": 0}
    finally:
        server.close()


def test_the_engine_runs_on_the_callers_thread_and_what_is_left_hears_it_stop(tmp_path):
    """Engine.run (what `lorakit serve` calls on its main thread) serves from the calling thread until close();
    a request still queued when it stops gets an error event, and run(alive=...) ends when alive() turns False."""
    import queue

    from lorakit.inference import Sampling
    from lorakit.inference.engine import Engine, Request, collect
    served = tiny_served(tmp_path)
    served.engine.close()
    model, tok = served.engine.model, served.engine.tokenizer
    ids = tok("w5 w6")["input_ids"]
    engine, got, threads = Engine(model, tok, slots=2, max_len=64), {}, set()

    def client():
        got["reply"] = collect(engine, ids, "a", Sampling(max_new_tokens=3))
        engine.close()

    caller = threading.Thread(target=client)
    engine.submit(Request(ids, None, Sampling(max_new_tokens=1), lambda e: threads.add(threading.current_thread())))
    caller.start()
    engine.run()
    caller.join()
    assert threads == {threading.current_thread()}
    assert got["reply"][0] == generated(served, "w5 w6", "a", 3, chat=False)

    stopped, events = Engine(model, tok, slots=1, max_len=64), queue.Queue()
    stopped.submit(Request(ids, None, Sampling(max_new_tokens=3), events.put))
    stopped.close()
    stopped.run()
    event = events.get_nowait()
    assert event.finish_reason == "error" and "shutting down" in event.error
    t0 = time.perf_counter()
    Engine(model, tok, slots=1, max_len=64).run(alive=lambda: time.perf_counter() - t0 < 0.2)


def test_cli_refuses_an_open_host_without_a_key_and_a_bad_port(capsys):
    from lorakit.cli import main
    assert main(["serve", "--api", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "--insecure" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as done:
        main(["serve", "--api", "--port", "99999"])
    assert done.value.code == 2 and "99999 is not a port" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_a_trained_run(tmp_path):
    """`lorakit serve --api RUN` in its own process: a trained run's adapter answers by its run's name."""
    import subprocess
    import sys
    from test_train import recipe, write_instruct
    llama = save_tiny("llama", tmp_path / "llama")
    r = recipe(tmp_path, model=str(llama), task="instruct", data=str(write_instruct(tmp_path / "a.jsonl")),
               max_steps=2)
    from lorakit.cli import main
    assert main(["train", r, "--out", str(tmp_path / "myrun")]) == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--api", str(tmp_path / "myrun"), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert {m["id"] for m in models["data"]} == {str(llama), "myrun"}
        reply = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none").completions.create(
            model="myrun", prompt="w5 w6", max_tokens=3, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    assert code == 0, proc.stdout.read()  # SIGTERM: HTTP and the engine stop cleanly


def test_a_busy_engine_waits_a_few_steps_to_prefill_requests_together(tmp_path):
    """With at least half its slots decoding, the engine holds waiting requests for up to DEFER_STEPS steps (a
    prefill of one prompt costs most of what a prefill of several does), and prefills at once when PREFILL_BATCH
    can go together or when fewer slots are busy; the count of steps held starts again at each prefill."""
    from lorakit.inference import Sampling
    from lorakit.inference.engine import DEFER_STEPS, PREFILL_BATCH, Engine, Request, prefill_now
    assert [prefill_now(5, 8, 1, 3, held) for held in range(DEFER_STEPS + 1)] == [False] * DEFER_STEPS + [True]
    assert prefill_now(4, 8, PREFILL_BATCH, 4, 0) and not prefill_now(5, 8, PREFILL_BATCH, 3, 0)
    assert prefill_now(3, 8, 1, 5, 0)  # fewer than half busy: no waiting
    served = tiny_served(tmp_path)
    served.engine.close()
    engine = Engine(served.engine.model, served.engine.tokenizer, slots=8, max_len=64)
    engine.running[:5] = [object()] * 5
    engine.waiting.append(Request([5, 6], None, Sampling(max_new_tokens=1), lambda e: None))
    for _ in range(DEFER_STEPS):
        engine._admit()
    assert engine.deferred == DEFER_STEPS and len(engine.waiting) == 1
    engine._admit()
    assert engine.deferred == 0 and not engine.waiting


def test_the_handoff_delivers_every_event_in_order_with_one_wakeup_per_batch():
    """serve/handoff.py: events put from another thread reach their asyncio queues in order, and the events put
    before the loop runs share one wake-up of the loop."""
    import asyncio

    from lorakit.serve.handoff import Handoff
    loop = asyncio.new_event_loop()
    wakeups = []
    call_soon = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: wakeups.append(1) or call_soon(*a)
    handoff = Handoff(loop)
    inboxes = [asyncio.Queue(), asyncio.Queue()]
    sender = threading.Thread(target=lambda: [handoff.put(inboxes[i % 2], i) for i in range(100)])
    sender.start()
    sender.join()

    async def drain():
        return [[await box.get() for _ in range(50)] for box in inboxes]

    try:
        got = loop.run_until_complete(drain())
    finally:
        loop.close()
    assert got == [list(range(0, 100, 2)), list(range(1, 100, 2))] and len(wakeups) == 1
