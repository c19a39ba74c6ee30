"""`lorakit serve`: the workbench behind the page (one base, adapters switched), the page's handlers, and the page
itself in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, randomize_lora, save_tiny
from lorakit import LoRAConfig, add_lora, save_adapter
from lorakit.serve import BASE, Workbench
from lorakit.errors import UserError
from lorakit.inference.sampling import Sampling
from lorakit.models.loading import load_model
from lorakit.models.trained import load_adapted

ARTIFACTS = REPO / "test-artifacts"
PROMPT = "w5 w6 w7"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny Llama, two instruction adapters (run directories with run.json/eval.json), two spam classifiers, a
    chat adapter, and an adapter of a tiny GPT-2 (another base)."""
    root = tmp_path_factory.mktemp("serve")
    llama = save_tiny("llama", root / "llama")
    gpt2 = save_tiny("gpt2", root / "gpt2")

    def run(name: str, model_dir: Path, task: str, seed: int, labels: list[str] | None = None) -> Path:
        model, _ = load_model(str(model_dir), task, num_labels=len(labels) if labels else None)
        trainable = ("score",) if task == "classify" else ()
        add_lora(model, LoRAConfig(r=4, alpha=16, targets="all-linear", trainable=trainable))
        randomize_lora(model, seed)
        if trainable:
            torch.manual_seed(seed)
            torch.nn.init.normal_(model.score.weight, std=1.0)
        meta = {"task": task, "model": str(model_dir), "template": "chat" if task == "chat" else "alpaca",
                "labels": labels, "max_length": 64}
        save_adapter(model, root / name / "adapter", metadata=meta)
        (root / name / "run.json").write_text(json.dumps({
            "config": {"data": "data/alpaca.jsonl", "r": 4, "alpha": 16, "targets": "all-linear"},
            "parameters": {"trainable": 4321, "total": 98765}, "data": {"train_rows": 30, "val_rows": 5, "test_rows": 5},
            "metrics": {"best_val_loss": 1.2345, "best_step": 7}, "timings": {"steps": 8, "train_s": 3.0}}))
        (root / name / "eval.json").write_text(json.dumps({"metrics": {"base": {"loss": 4.5}, "lora": {"loss": 2.25}}}))
        return root / name
    return {"llama": llama, "a": run("alpha", llama, "instruct", 1), "b": run("beta", llama, "instruct", 2),
            "c1": run("spam1", llama, "classify", 3, ["ham", "spam"]),
            "c2": run("spam2", llama, "classify", 4, ["ham", "spam"]), "gpt2": run("g", gpt2, "instruct", 5),
            "chat": run("talk", llama, "chat", 6)}


GREEDY = Sampling(max_new_tokens=12)


def reference(adapter: Path | None, llama: Path, prompt: str) -> tuple[str, int]:
    """Greedy answer and its token count from a separately loaded model and transformers' generate."""
    from lorakit.data.prompts import format_prompt
    model, tok, _ = load_adapted(adapter) if adapter else (*load_model(str(llama)), {})
    ids = tok(format_prompt(tok, prompt, "", "alpaca"), return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**ids, **GREEDY.kwargs(tok))[0, ids["input_ids"].shape[1]:]
    return tok.decode(out, skip_special_tokens=True).strip(), len(out)


def last(answers) -> object:
    items = list(answers)
    assert len(items) >= 2  # streamed: pieces, then the final (timed) answer
    return items[-1]


def test_workbench_answers_match_separately_loaded_models_and_switch_without_reloading(tiny_runs):
    wb = Workbench(str(tiny_runs["llama"]), [str(tiny_runs["a"]), str(tiny_runs["b"] / "adapter")])
    assert list(wb.adapters) == ["alpha", "beta"]
    model = wb.model
    got = {col: last(wb.answer(col, PROMPT, GREEDY)) for col in (BASE, "alpha", "beta", BASE)}
    assert wb.model is model  # one base, never reloaded
    for col, adapter in ((BASE, None), ("alpha", tiny_runs["a"] / "adapter"), ("beta", tiny_runs["b"] / "adapter")):
        text, n = reference(adapter, tiny_runs["llama"], PROMPT)
        assert got[col].text.strip() == text and got[col].tokens == n and got[col].done
        assert "tokens/s" in got[col].stats
    assert len({got[BASE].text, got["alpha"].text, got["beta"].text}) == 3  # non-trivial adapters differ
    submitted, submit = [], wb.engine.submit
    wb.engine.submit = lambda request: (submitted.append(request), submit(request))[1]
    pending = wb.answer("alpha", PROMPT, Sampling(max_new_tokens=40))
    next(pending)
    pending.close()  # a page closed mid-answer: generation ends and the model is free for the next request
    assert not wb.lock.locked() and submitted[-1].cancelled.is_set()
    assert last(wb.answer(BASE, PROMPT, GREEDY)).text == got[BASE].text


def test_workbench_classifier_heads_are_switched_with_their_adapters(tiny_runs):
    wb = Workbench(None, [str(tiny_runs["c1"]), str(tiny_runs["c2"])])
    assert wb.task == "classify" and wb.labels == ["ham", "spam"]
    text = "w10 w11 w12"
    first = wb.classify("spam1", text)
    for name, run in (("spam2", "c2"), ("spam1", "c1")):
        model, tok, _ = load_adapted(tiny_runs[run] / "adapter")
        with torch.no_grad():
            ref = model(**tok([text], return_tensors="pt")).logits.softmax(-1)[0]
        got = wb.classify(name, text)
        assert list(got) == ["ham", "spam"] and sum(got.values()) == pytest.approx(1.0)
        assert [got["ham"], got["spam"]] == pytest.approx(ref.tolist(), abs=1e-5)
    assert wb.classify("spam1", text) == pytest.approx(first)
    # the base: adapters off and the head it had before any adapter was loaded (each adapter has its own copy)
    head = wb.model.get_submodule("score")
    assert set(head.copies) == {"spam1", "spam2"}
    fresh, tok = load_model(str(tiny_runs["llama"]), "classify", num_labels=2)
    with torch.no_grad():
        fresh.score.weight.copy_(head.original.weight)
        ref = fresh.eval()(**tok([text], return_tensors="pt")).logits.softmax(-1)[0]
    base = wb.classify(BASE, text)
    assert [base["ham"], base["spam"]] == pytest.approx(ref.tolist(), abs=1e-5) and base != pytest.approx(first)
    saved = load_file(tiny_runs["c1"] / "adapter" / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert torch.equal(head.copies["spam1"].weight, saved) and not torch.equal(head.original.weight, saved)


def test_workbench_errors_name_the_problem_and_it_keeps_serving(tiny_runs, tmp_path):
    wb = Workbench(str(tiny_runs["llama"]), [str(tiny_runs["a"])])
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    cases = [("", "give an adapter directory"), (tmp_path / "nope", "no such directory"),
             (tmp_path / "empty", "not an adapter directory"), (tmp_path / "broken", "not valid JSON"),
             (tiny_runs["gpt2"], "trained on base model"), (tiny_runs["c1"], "is for task 'classify'")]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            wb.add(str(path))
    assert list(wb.adapters) == ["alpha"]
    with pytest.raises(UserError, match="type an instruction"):
        list(wb.answer(BASE, "  ", GREEDY))
    with pytest.raises(UserError, match="no adapter named 'zeta'"):
        list(wb.answer("zeta", PROMPT, GREEDY))
    assert last(wb.answer("alpha", PROMPT, GREEDY)).text == reference(tiny_runs["a"] / "adapter", tiny_runs["llama"], PROMPT)[0]


def test_summary_shows_task_data_parameters_and_metrics(tiny_runs):
    wb = Workbench(str(tiny_runs["llama"]), [str(tiny_runs["a"])])
    s = wb.summary("alpha")
    for part in ("**task** instruct", "data/alpaca.jsonl", "30 train / 5 val / 5 test", "4,321 trainable of 98,765",
                 "best val loss 1.2345", "| base | 4.5000 |", "| lora | 2.2500 |"):
        assert part in s, part


def test_page_handlers_stream_and_report_errors_on_the_page(tiny_runs):
    pytest.importorskip("gradio")
    from lorakit.serve.page import ADAPTER_SLOTS, load_adapter, run_generation
    wb = Workbench(str(tiny_runs["llama"]), [str(tiny_runs["a"])])
    updates = list(run_generation(wb, PROMPT, 0.0, 1.0, 0, 12, 42, ["alpha"]))
    assert len(updates) > 4 and len(updates[-1]) == 1 + 2 * (1 + ADAPTER_SLOTS)
    status, base, base_stats, adapted, adapted_stats = updates[-1][:5]
    assert status == "" and base == reference(None, tiny_runs["llama"], PROMPT)[0] and adapted and adapted != base
    assert "tokens/s" in base_stats and "…" not in adapted_stats
    assert any(u[1] and not u[3] for u in updates)  # the base column streamed before the adapter's began
    sampled = [list(run_generation(wb, PROMPT, 1.0, 0.9, 20, 12, seed, []))[-1][1] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the seed makes sampling repeatable
    err = list(run_generation(wb, "", 0.0, 1.0, 0, 12, 42, ["alpha"]))[-1]
    assert "type an instruction" in err[0]
    status, _, _ = load_adapter(wb, str(tiny_runs["gpt2"]), ["alpha"])
    assert "trained on base model" in status and list(wb.adapters) == ["alpha"]
    status, chosen, _ = load_adapter(wb, str(tiny_runs["b"]), ["alpha"])
    assert "loaded **beta**" in status and chosen["value"] == ["alpha", "beta"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("no chromium: apt-get install chromium")
    return path


def open_page(pw):
    """(browser, a 1400x1000 page) in Debian's Chromium, headless and offline."""
    browser = pw.chromium.launch(executable_path=chromium(), args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"])
    return browser, browser.new_page(viewport={"width": 1400, "height": 1000})


def test_page_in_headless_chromium(tiny_runs):
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    from lorakit.serve.page import serve
    wb = Workbench(str(tiny_runs["llama"]), [str(tiny_runs["a"])])
    port = free_port()
    page_app = serve(wb, port=port, block=False)
    try:
        with sync_api.sync_playwright() as pw:
            browser, page = open_page(pw)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle", timeout=60_000)
            page.locator("#instruction textarea").fill(PROMPT)
            page.locator("#generate").click()
            page.wait_for_function("() => { const s = document.querySelector('#stats-1');"
                                   " return s && s.innerText.includes('tokens/s') && !s.innerText.includes('…'); }",
                                   timeout=60_000)
            base = page.locator("#answer-0 textarea").input_value()
            adapted = page.locator("#answer-1 textarea").input_value()
            assert base and adapted and base != adapted
            assert base.startswith(reference(None, tiny_runs["llama"], PROMPT)[0])  # greedy: 12 tokens, then more
            assert "tokens/s" in page.locator("#stats-0").inner_text()
            page.locator("#adapter-path textarea").fill(str(tiny_runs["gpt2"]))
            page.locator("#load-adapter").click()
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('trained on base model')",
                                   timeout=30_000)
            assert "beta" not in page.locator("#chosen").inner_text()
            assert "4,321 trainable" in page.locator("#summary").inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
            browser.close()
    finally:
        page_app.close()
    assert (ARTIFACTS / "serve.png").stat().st_size > 10_000


def test_chat_page_in_headless_chromium(tiny_runs):
    """Each column a conversation of its own: two messages sent, each column shows both turns and its two replies."""
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    from lorakit.serve.page import serve
    wb = Workbench(str(tiny_runs["llama"]), [str(tiny_runs["chat"])])
    assert wb.task == "chat"
    port = free_port()
    page_app = serve(wb, port=port, block=False)
    done = ("previous => { const s = document.querySelector('#stats-1'); return s && s.innerText !== previous"
            " && s.innerText.includes('tokens/s') && !s.innerText.includes('…'); }")
    try:
        with sync_api.sync_playwright() as pw:
            browser, page = open_page(pw)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
            page.locator("#instruction textarea").wait_for(timeout=60_000)
            for message in ("w21 w22", "w33 w34"):
                previous = page.locator("#stats-1").inner_text()  # the last reply's stats: wait for new ones
                page.locator("#instruction textarea").fill(message)
                page.locator("#generate").click()
                page.wait_for_function(done, arg=previous, timeout=60_000)
                page.wait_for_function(f"() => document.querySelector('#answer-1').innerText.includes('{message}')",
                                       timeout=30_000)
            for column in ("#answer-0", "#answer-1"):
                text = page.locator(column).inner_text()
                assert "w21 w22" in text and "w33 w34" in text
            base = wb.reply(BASE, [{"role": "user", "content": "w21 w22"}], GREEDY)
            first_reply = list(base)[-1].text
            assert first_reply and first_reply.split()[0] in page.locator("#answer-0").inner_text()
            assert page.locator("#instruction textarea").input_value() == ""  # sent: the box is cleared
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve-chat.png"), full_page=True)
            browser.close()
    finally:
        page_app.close()


def test_batched_generation_sorts_by_length_and_keeps_the_order(tiny_runs):
    """Batches are formed from prompts of similar length; each completion is the one transformers' generate gives
    for that batch, returned in the prompts' order."""
    from lorakit.data.prompts import format_prompt
    from lorakit.inference.generation import _encode, generate, new_token_counts
    model, tok = load_model(str(tiny_runs["llama"]))
    prompts = [format_prompt(tok, " ".join(f"w{5 + k}" for k in range(n)), "", "alpaca") for n in (9, 1, 5, 2, 8)]
    got = generate(model, tok, prompts, GREEDY, batch_size=2)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    assert order == [1, 3, 2, 4, 0]
    want = [None] * len(prompts)
    for i in range(0, len(order), 2):
        rows = order[i:i + 2]
        enc = _encode(tok, [prompts[j] for j in rows], "alpaca", "cpu")
        with torch.no_grad():
            new = model.generate(**enc, **GREEDY.kwargs(tok))[:, enc["input_ids"].shape[1]:]
        for j, text in zip(rows, tok.batch_decode(new, skip_special_tokens=True)):
            want[j] = text.strip()
    assert got == want
    eos = tok.eos_token_id
    assert new_token_counts(torch.tensor([[5, 6, eos, eos], [5, 6, 7, 8], [eos, eos, eos, eos]]), eos) == [3, 4, 1]
