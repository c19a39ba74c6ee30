"""lorakit export: GGUF files checked by two independent readers. transformers' GGUF loader (no build: always run)
and llama.cpp itself through llama-cpp-python (`make llama-cpp`; CI builds it, `make test` without it skips those
tests with a note)."""
from __future__ import annotations

import json
import shutil
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize_lora, save_tiny
from lorakit import LoRAConfig, add_lora, save_adapter
from lorakit.cli import main
from lorakit.export.ollama import ollama_template
from lorakit.export.gguf import permute_rows
from lorakit.engine.registry import lora_layers
from lorakit.engine.inject import merge_and_unload
from lorakit.models.loading import load_model, load_tokenizer, resolve_spec

TEXTS = ["Hello there, how are you?", "The year 2024 had 366 days; 12 months.", "<|im_start|>user\nHi!<|im_end|>\n"]


def small_lora(model, seed: int, std: float = 0.02) -> None:
    """Random B matrices small enough to keep a real model's text sensible, large enough to change it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_B:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * std)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Llama with SmolLM2's real tokenizer (byte-level BPE, 49,152 tokens, its chat template) and run
    directories: LoRA, rsLoRA, QLoRA (NF4), DoRA, one with a trained module, a full fine-tune, a classifier, GPT-2."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("export")
    tok = load_tokenizer(resolve_spec("smollm2")[0])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=100000.0)
    LlamaForCausalLM(config).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    base = str(root / "tiny")

    def run(name: str, task: str = "instruct", model_dir: str = base, **lora) -> Path:
        model, _ = load_model(model_dir, task, num_labels=2 if task == "classify" else None)
        quantize = lora.get("quantize")
        add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all-linear", **lora))
        randomize_lora(model, seed=len(name))
        meta = {"task": task, "model": model_dir, "template": "chat", "labels": ["a", "b"] if task == "classify" else None,
                "quantize": quantize, "name": name}
        save_adapter(model, root / name / "adapter", metadata=meta)
        return root / name

    full = root / "full" / "model"
    LlamaForCausalLM(config).save_pretrained(full)
    tok.save_pretrained(full)
    (full / "lorakit.json").write_text(json.dumps({"task": "instruct", "model": base}))
    return {"root": root, "base": base, "tok": tok, "lora": run("lora"), "rslora": run("rs", rslora=True),
            "qlora": run("q", quantize="nf4"), "dora": run("dora", dora=True),
            "trained": run("head", trainable=("lm_head",)), "full": root / "full", "classify": run("cls", "classify"),
            "gpt2": run("g2", model_dir=str(save_tiny("gpt2", root / "gpt2")))}


def merged_model(run_dir: Path):
    from lorakit.models.trained import load_trained
    model, tok, _ = load_trained(run_dir / "adapter")
    return merge_and_unload(model), tok


def read_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, tok, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0]


def test_f32_export_read_by_transformers_gives_the_merged_model(runs, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", str(runs["lora"]), "--format", "gguf", "--out", str(out)]) == 0
    merged, tok = merged_model(runs["lora"])
    reread = read_gguf_model(out)
    for text in TEXTS:
        torch.testing.assert_close(logits(reread, tok, text), logits(merged, tok, text), atol=1e-5, rtol=0)
    from transformers import AutoTokenizer
    own = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)  # the tokenizer written into the file
    for text in TEXTS + ["x = 12345 + 678\n\n  indented\ttab"]:
        assert own(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert own.chat_template == tok.chat_template


@pytest.mark.parametrize("quant, agreement", [("f16", 0.95), ("q8_0", 0.90)])
def test_quantised_exports_agree_with_the_merged_model(runs, tmp_path, quant, agreement):
    out = tmp_path / f"m-{quant}.gguf"
    assert main(["export", str(runs["lora"]), "--quant", quant, "--out", str(out)]) == 0
    merged, tok = merged_model(runs["lora"])
    reread = read_gguf_model(out)
    same = [(logits(reread, tok, t).argmax(-1) == logits(merged, tok, t).argmax(-1)).float() for t in TEXTS]
    assert torch.cat(same).mean() >= agreement


def test_qlora_is_merged_into_the_dequantised_nf4_base(runs, tmp_path):
    from lorakit.models.trained import load_trained
    out = tmp_path / "q.gguf"
    assert main(["export", str(runs["qlora"]), "--out", str(out)]) == 0
    qlora, tok, _ = load_trained(runs["qlora"] / "adapter")  # NF4 base + unmerged adapter: what was evaluated
    reread = read_gguf_model(out)
    from lorakit.engine.peft_format import load_adapter
    naive, _ = load_model(runs["base"])  # the adapter merged into the original fp32 weights instead
    load_adapter(naive, runs["qlora"] / "adapter", "default")
    naive = merge_and_unload(naive)
    text = TEXTS[0]
    torch.testing.assert_close(logits(reread, tok, text), logits(qlora, tok, text), atol=1e-4, rtol=0)
    assert (logits(naive, tok, text) - logits(qlora, tok, text)).abs().max() > 1e-3


def test_full_fine_tune_and_base_exports(runs, tmp_path):
    from transformers import AutoModelForCausalLM
    assert main(["export", str(runs["full"]), "--out", str(tmp_path / "full.gguf")]) == 0
    full = AutoModelForCausalLM.from_pretrained(runs["full"] / "model").eval()
    torch.testing.assert_close(logits(read_gguf_model(tmp_path / "full.gguf"), runs["tok"], TEXTS[1]),
                               logits(full, runs["tok"], TEXTS[1]), atol=1e-5, rtol=0)
    assert main(["export", str(runs["lora"]), "--base", "--out", str(tmp_path / "base.gguf")]) == 0
    base, _ = load_model(runs["base"])
    torch.testing.assert_close(logits(read_gguf_model(tmp_path / "base.gguf"), runs["tok"], TEXTS[1]),
                               logits(base, runs["tok"], TEXTS[1]), atol=1e-5, rtol=0)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_lora_gguf_plus_base_is_the_merged_export(runs, tmp_path, kind):
    """llama.cpp adds (alpha / r) · B·A to each base tensor: that, from the two files, is the merged export's tensor
    (q/k rows permuted alike in both), and alpha reproduces rsLoRA's alpha / sqrt(r)."""
    from gguf import GGUFReader
    run = runs[kind]
    assert main(["export", str(run), "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf")]) == 0
    assert main(["export", str(run), "--base", "--out", str(tmp_path / "base.gguf")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "merged.gguf")]) == 0
    reader = GGUFReader(tmp_path / "a.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    alpha, r = field("adapter.lora.alpha"), 4
    assert alpha == pytest.approx(8 * 2 if kind == "rslora" else 8)  # rsLoRA: alpha/sqrt(r) = alpha'/r
    lora, base, merged = (_tensors(tmp_path / f) for f in ("a.gguf", "base.gguf", "merged.gguf"))
    adapted = sorted(n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a"))
    assert len(adapted) == 2 * 7 and "blk.0.attn_q.weight" in adapted and "blk.1.ffn_down.weight" in adapted
    for name in adapted:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape[0] == r and b.shape[1] == r
        np.testing.assert_allclose(base[name] + alpha / r * b @ a, merged[name], atol=1e-5, rtol=0, err_msg=name)
    assert not np.allclose(base["blk.0.attn_q.weight"], merged["blk.0.attn_q.weight"], atol=1e-4)


def test_permutation_is_llama_cpp_s_row_order():
    """Within each head the rows of the two halves alternate (the rotary pairs llama.cpp rotates together)."""
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of 4 rows
    got = permute_rows(w, 2)
    assert [int(r[0]) // 3 for r in got] == [0, 2, 1, 3, 4, 6, 5, 7]


def test_ollama_directory_has_the_gguf_and_a_modelfile(runs, tmp_path):
    out = tmp_path / "ollama"
    assert main(["export", str(runs["lora"]), "--format", "ollama", "--quant", "q8_0", "--out", str(out)]) == 0
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./lora-q8_0.gguf\n") and (out / "lora-q8_0.gguf").stat().st_size > 100_000
    template, stops = ollama_template(runs["tok"].chat_template)
    assert f'TEMPLATE """{template}"""' in modelfile and "<|im_start|>{{ .Role }}" in template
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and stops[0] == "<|im_end|>"
    # the system prompt SmolLM2's template adds when a conversation has none, as transformers renders it
    rendered = runs["tok"].apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    system = next(ln for ln in modelfile.splitlines() if ln.startswith("SYSTEM"))[len('SYSTEM """'):-len('"""')]
    assert system.startswith("You are a helpful AI assistant") and f"<|im_start|>system\n{system}<|im_end|>" in rendered


def test_ollama_modelfile_of_an_alpaca_run_has_its_prompt(runs, tmp_path):
    """An instruct run trained in the Alpaca prompt runs in Ollama in that prompt, with no chat system prompt."""
    run = tmp_path / "alpaca-run"
    shutil.copytree(runs["lora"], run)
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    (run / "adapter" / "lorakit.json").write_text(json.dumps(meta | {"template": "alpaca"}))
    assert main(["export", str(run), "--format", "ollama", "--out", str(tmp_path / "o")]) == 0
    modelfile = (tmp_path / "o" / "Modelfile").read_text()
    from lorakit.data.prompts import format_prompt
    expected = format_prompt(runs["tok"], "{{ .Prompt }}", "", "alpaca")
    assert f'TEMPLATE """{expected}"""' in modelfile and "SYSTEM" not in modelfile and "<|im_start|>" not in modelfile


REFUSED = {
    "a classifier": (lambda r, t: [str(r["classify"]), "--out", str(t / "c.gguf")], ["classification run",
                                                                                     "classifier head"]),
    "GPT-2": (lambda r, t: [str(r["gpt2"]), "--out", str(t / "g.gguf")], ["supports llama, mistral, qwen2",
                                                                          "'gpt2'"]),
    "DoRA as a llama.cpp LoRA": (lambda r, t: [str(r["dora"]), "--format", "gguf-lora", "--out", str(t / "d.gguf")],
                                 ["DoRA adapter cannot be written", "--format gguf"]),
    "a trained module as a llama.cpp LoRA": (lambda r, t: [str(r["trained"]), "--format", "gguf-lora", "--out",
                                                           str(t / "h.gguf")], ["trains lm_head in full"]),
    "a full fine-tune as a LoRA": (lambda r, t: [str(r["full"]), "--format", "gguf-lora", "--out", str(t / "f.gguf")],
                                   ["full fine-tune", "no adapter"]),
    "an existing file": (lambda r, t: [str(r["lora"]), "--out", str(_existing(t))], ["exists", "--force"]),
    "a directory for a file": (lambda r, t: [str(r["lora"]), "--out", str(t)], ["is a directory", "model.gguf"]),
    "not a run": (lambda r, t: [str(t), "--out", str(t / "x.gguf")], ["not a run directory"]),
}


def _existing(tmp: Path) -> Path:
    (tmp / "old.gguf").write_bytes(b"keep me")
    return tmp / "old.gguf"


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_export_refuses_with_one_line(runs, tmp_path, case, capsys):
    args, words = REFUSED[case]
    assert main(["export", *args(runs, tmp_path)]) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("lorakit: error:"))
    assert "Traceback" not in err and all(w in line for w in words), line
    if case == "an existing file":
        assert (tmp_path / "old.gguf").read_bytes() == b"keep me"
    assert not any(p.suffix == ".gguf" and p.name != "old.gguf" for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------ in llama.cpp itself

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers.",
           "Explain LoRA in one sentence.", "Translate 'good morning' into Spanish."]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must build llama-cpp-python (make llama-cpp)")
        pytest.skip("llama-cpp-python is not built: `make llama-cpp` (about 20 minutes) runs these tests")
    return llama_cpp


@pytest.fixture(scope="module")
def smol_exports(tmp_path_factory, llama_cpp):
    """SmolLM2-135M with a random LoRA as a run, exported as f32/f16/q8_0/q4_0, its base as f32, and the LoRA."""
    root = tmp_path_factory.mktemp("smol-export")
    model, tok = load_model("smollm2")
    add_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, targets="all-linear"))
    small_lora(model, seed=3)
    save_adapter(model, root / "run" / "adapter", metadata={"task": "instruct", "model": "smollm2",
                                                             "template": "chat", "name": "smol"})
    files = {}
    for name, extra in (("f32", []), ("f16", ["--quant", "f16"]), ("q8_0", ["--quant", "q8_0"]),
                        ("q4_0", ["--quant", "q4_0"]), ("base", ["--base"]), ("lora", ["--format", "gguf-lora"])):
        files[name] = root / f"{name}.gguf"
        assert main(["export", str(root / "run"), "--out", str(files[name]), *extra]) == 0
    merged = merge_and_unload(model).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in PROMPTS]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return {"files": files, "merged": merged, "tok": tok, "prompts": prompts, "ids": ids,
            "greedy": [hf_greedy(merged, i) for i in ids]}


@torch.no_grad()
def hf_greedy(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """NEW_TOKENS greedy tokens (end-of-turn tokens included: no stopping) and the logits at every position."""
    seq = list(ids)
    for _ in range(NEW_TOKENS):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):], model(torch.tensor([seq])).logits[0]


def llama_run(llama_cpp, path: Path, ids: list[int], lora: Path | None = None):
    """llama.cpp on the file, its KV cache in f32 (the default f16 cache rounds keys and values)."""
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2,
                           logits_all=True, verbose=False, seed=0, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32)


def cpp_greedy(llm, ids: list[int]) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, np.array(llm.scores[: llm.n_tokens])


def test_llama_cpp_f32_greedy_equals_the_merged_model(smol_exports, llama_cpp):
    s = smol_exports
    llm = llama_run(llama_cpp, s["files"]["f32"], s["ids"][0])
    for text, ids, (want, hf_logits) in zip(s["prompts"], s["ids"], s["greedy"]):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # the same tokenizer
        got, cpp_logits = cpp_greedy(llm, ids)
        assert got == want, (text, s["tok"].decode(got), s["tok"].decode(want))
        assert np.abs(cpp_logits[len(ids) - 1] - hf_logits[len(ids) - 1].numpy()).max() < 1e-3


@pytest.mark.parametrize("quant, agreement", [("f16", 0.95), ("q8_0", 0.90), ("q4_0", 0.0)])
def test_llama_cpp_quantised_top1_agreement(smol_exports, llama_cpp, quant, agreement, record_property):
    s = smol_exports
    llm = llama_run(llama_cpp, s["files"][quant], s["ids"][0])
    same = []
    for ids, (want, hf_logits) in zip(s["ids"], s["greedy"]):
        llm.reset()
        llm.eval(ids + want)  # the merged model's own continuation, teacher-forced
        cpp = np.array(llm.scores[len(ids) - 1: len(ids) + len(want)]).argmax(-1)
        same += list(cpp == hf_logits[len(ids) - 1:].argmax(-1).numpy())
    record_property(f"top1_{quant}", float(np.mean(same)))  # q4_0's is reported, not required
    print(f"\nllama.cpp {quant}: top-1 agreement with the merged model {np.mean(same):.3f} over {len(same)} positions")
    assert np.mean(same) >= agreement


def test_llama_cpp_lora_on_the_base_equals_the_merged_export(smol_exports, llama_cpp):
    s = smol_exports
    merged = llama_run(llama_cpp, s["files"]["f32"], s["ids"][0])
    with_lora = llama_run(llama_cpp, s["files"]["base"], s["ids"][0], lora=s["files"]["lora"])
    for ids in s["ids"]:
        assert cpp_greedy(with_lora, ids)[0] == cpp_greedy(merged, ids)[0]


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_exports_read_back_as_the_merged_model(runs, tmp_path, kind):
    """The other supported families: Qwen2 (q/k/v biases, no row permutation) and Mistral (written as llama)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cls, cfg_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig)}[kind]
    torch.manual_seed(1)
    config = cfg_cls(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=kind == "qwen2", bos_token_id=1, eos_token_id=2)
    model = cls(config)
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:  # real Qwen2 biases are not zero: make the test see them
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "base")
    runs["tok"].save_pretrained(tmp_path / "base")
    adapted, _ = load_model(str(tmp_path / "base"))
    add_lora(adapted, LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    randomize_lora(adapted, seed=9)
    save_adapter(adapted, tmp_path / "run" / "adapter", metadata={"task": "instruct", "model": str(tmp_path / "base")})
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf")]) == 0
    merged = merge_and_unload(adapted).eval()
    for text in TEXTS:
        torch.testing.assert_close(logits(read_gguf_model(tmp_path / "m.gguf"), runs["tok"], text),
                                   logits(merged, runs["tok"], text), atol=1e-5, rtol=0)
