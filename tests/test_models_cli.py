"""Model loading (embedded defaults offline, local directories, errors) and the `lorakit` command."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, save_tiny
from lorakit import LoRAConfig, add_lora, parameter_report
from lorakit.cli import main
from lorakit.models.loading import ModelError, head_name, load_model


def test_local_directory_per_task(tmp_path):
    d = save_tiny("llama", tmp_path / "llama")
    model, tok = load_model(str(d), "instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token == "<pad>"
    clf, _ = load_model(str(d), "classify", num_labels=3)
    assert type(clf).__name__ == "LlamaForSequenceClassification" and head_name(clf) == "score"
    assert clf.score.out_features == 3 and clf.config.pad_token_id == tok.pad_token_id
    t5, _ = load_model(str(save_tiny("t5", tmp_path / "t5")), "summarize")
    assert type(t5).__name__ == "T5ForConditionalGeneration"


def test_model_errors_name_the_spec(tmp_path):
    with pytest.raises(ModelError, match=r"model 'org/missing-model' could not be loaded .* offline choices: smollm2, minilm"):
        load_model("org/missing-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="directory has no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="no such GGUF file"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="task 'translate' is not one of"):
        load_model(str(tmp_path / "empty"), "translate")
    with pytest.raises(ModelError, match="num_labels >= 2"):
        load_model(str(save_tiny("llama", tmp_path / "m")), "classify", num_labels=1)


def test_cli_inspect_prints_the_report(tmp_path, capsys):
    d = save_tiny("llama", tmp_path / "m")
    assert main(["inspect", "--model", str(d), "--r", "4", "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    model, _ = load_model(str(d))
    expected = parameter_report(add_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj"])))
    assert str(expected) in out and "4 modules adapted" in out
    assert "model.layers.*.self_attn.q_proj" in out and "mlp" not in out


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    d = save_tiny("llama", tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "lorakit", "inspect", "--model", str(d), "--targets", "q_prj"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2
    assert "lorakit: error: target 'q_prj' matches no module; closest names: q_proj" in run.stderr
    assert "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "lorakit", "inspect", "--model", str(d), "--r", "0"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "r must be a positive integer" in run.stderr and "Traceback" not in run.stderr


def test_embedded_minilm_offline_classifier():
    model, tok = load_model("minilm", "classify", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification" and head_name(model) == "classifier"
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    enc = tok(["free entry to win a prize", "see you at lunch"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 2)


def test_embedded_smollm2_offline_answers_paris():
    model, tok = load_model("smollm2", "instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config._name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_custom_wrapper_example_in_docs_runs(tmp_path, monkeypatch):
    """docs/custom_model.md: its code runs as written, trains, and round-trips through save/load."""
    import re
    text = (REPO / "docs" / "custom_model.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "docs_example"}
    exec(compile(code, "docs/custom_model.md", "exec"), ns)
    losses, model = ns["losses"], ns["model"]
    assert losses[-1] < losses[0]
    rep = parameter_report(model)
    lora = sum(r["trainable"] for r in rep.rows if r["r"])
    assert lora == 12 * 4 * (32 + 32)  # q and v in 2 encoder self-, 2 decoder self- and 2 cross-attentions
    full = {r["module"]: r["trainable"] for r in rep.rows if not r["r"]}
    assert full == {"feature_emb": 4 * 32, "mix": 32 * 32 + 32}
    keys = __import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "feature-t5-adapter" /
                                                                             "adapter_model.safetensors")
    assert {"base_model.model.feature_emb.weight", "base_model.model.mix.0.weight"} <= set(keys)


def test_pad_token_falls_back_to_eos(tmp_path):
    from conftest import TINY, word_tokenizer
    tok = word_tokenizer()
    tok.pad_token = None
    TINY["gpt2"]().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_model(str(tmp_path), "instruct")
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_classifier_adapter_restores_head_and_labels(tmp_path):
    from lorakit import save_adapter
    from lorakit.models.trained import load_adapted
    d = save_tiny("llama", tmp_path / "base")
    model, tok = load_model(str(d), "classify", num_labels=3)
    add_lora(model, LoRAConfig(r=2, trainable=["score"]))
    with torch.no_grad():
        model.score.weight.normal_()
    save_adapter(model, tmp_path / "ad", metadata={"task": "classify", "model": str(d), "labels": ["a", "b", "c"]})
    enc = tok(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    model.eval()
    restored, _, meta = load_adapted(tmp_path / "ad")
    assert meta["labels"] == ["a", "b", "c"] and restored.config.id2label == {0: "a", 1: "b", 2: "c"}
    with torch.no_grad():
        assert torch.equal(restored(**enc).logits, model(**enc).logits)


def test_local_gguf_file_loads_and_shares_the_cache():
    from lorakit.models.loading import EMBEDDED, _package_path, resolve_spec
    gguf = _package_path(*EMBEDDED["smollm2"][:2])
    path, name = resolve_spec(str(gguf))
    assert path == resolve_spec("smollm2")[0] and name == str(gguf)
    model, tok = load_model(str(gguf), "instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert tok.chat_template


def test_seq2seq_encoding_puts_the_dialogue_in_the_encoder(tmp_path):
    from conftest import word_tokenizer
    from lorakit.data.prompts import SummarizationData
    (tmp_path / "d.jsonl").write_text('{"dialogue": "w1 w2 w3 w4", "summary": "w5 w6"}\n')
    enc = SummarizationData.load(tmp_path / "d.jsonl").encode_seq2seq(word_tokenizer(), max_source=3)
    tok = word_tokenizer()
    assert enc[0].input_ids == tok("w1 w2 w3")["input_ids"] and enc[0].labels == tok("w5 w6")["input_ids"]
