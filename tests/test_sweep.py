"""`lorakit sweep`, the attention / mlp target presets and BERTScore: each against an independent account (the runs'
own run.json and eval.json, modules named by hand, BERTScore computed from the encoder's hidden states)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import TINY, save_tiny
from lorakit import LoRAConfig, add_lora
from lorakit.cli import main
from lorakit.engine.registry import lora_layers
from lorakit.engine.report import parameter_report
from lorakit.engine.config import LoRAError
from test_train import recipe, write_dialogues


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64))


def _layer_names(model: nn.Module, parents: tuple[str, ...], leaves: tuple[str, ...]) -> set[str]:
    """Modules whose last name is in `leaves` and whose parent's last name is in `parents`: the preset by hand."""
    return {n for n, _ in model.named_modules() if n.count(".") >= 1
            and n.rsplit(".", 2)[-2] in parents and n.rsplit(".", 1)[-1] in leaves}


# model: (attention by hand, mlp by hand)
BY_HAND = {
    "llama": lambda m: (_layer_names(m, ("self_attn",), ("q_proj", "k_proj", "v_proj", "o_proj")),
                        _layer_names(m, ("mlp",), ("gate_proj", "up_proj", "down_proj"))),
    "gpt2": lambda m: (_layer_names(m, ("attn",), ("c_attn", "c_proj")), _layer_names(m, ("mlp",), ("c_fc", "c_proj"))),
    "t5": lambda m: (_layer_names(m, ("SelfAttention", "EncDecAttention"), ("q", "k", "v", "o")),
                     _layer_names(m, ("DenseReluDense",), ("wi", "wo"))),
    "bert": lambda m: (_layer_names(m, ("self",), ("query", "key", "value")),
                       {n for n, _ in m.named_modules() if n.endswith(("intermediate.dense", ".output.dense"))
                        and ".attention." not in n}),
}


@pytest.mark.parametrize("kind", sorted(BY_HAND))
def test_attention_and_mlp_presets_select_the_blocks_modules(kind):
    build = tiny_bert if kind == "bert" else TINY[kind]
    attention, mlp = BY_HAND[kind](build())
    assert attention and mlp and not attention & mlp
    chosen = {}
    for preset in ("attention", "mlp", "all-linear"):
        model = add_lora(build(), LoRAConfig(r=2, targets=preset))
        chosen[preset] = {n for n, _ in lora_layers(model)}
    assert chosen["attention"] == attention and chosen["mlp"] == mlp
    if kind != "bert":  # BERT's attention.output.dense and pooler are linear but in neither preset
        assert chosen["attention"] | chosen["mlp"] == chosen["all-linear"]
    else:
        assert chosen["all-linear"] - attention - mlp == {n for n in chosen["all-linear"]
                                                           if n.endswith(("attention.output.dense", "pooler.dense"))}


def test_a_preset_on_an_unknown_architecture_names_what_to_do():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(LoRAError, match=r"targets 'attention' is defined for model types llama, .*this model's is "
                                        r"None: use all-linear or name the modules"):
        add_lora(model, LoRAConfig(targets="attention"))


def test_targets_preset_from_the_command_line(tmp_path, capsys):
    path = save_tiny("gpt2", tmp_path / "gpt2")
    assert main(["inspect", "--model", str(path), "--targets", "mlp", "--all"]) == 0
    out = capsys.readouterr().out
    assert "h.0.mlp.c_fc" in out and "h.1.mlp.c_proj" in out and "attn" not in out


def _manual_bertscore(prediction: str, references: list[str]) -> float:
    """BERTScore F1 from the encoder's 6th hidden layer: each token (but [CLS] and [SEP], which idf-free BERTScore
    weighs 0) takes its most similar token of the other text by cosine ([CLS] and [SEP] among the candidates);
    precision and recall are their means; the best F1 over the references."""
    from transformers import AutoModel, AutoTokenizer
    from lorakit.models.loading import resolve_spec
    path, _ = resolve_spec("minilm")
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(text):
        with torch.no_grad():
            hidden = enc(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[6][0]
        return torch.nn.functional.normalize(hidden, dim=-1)

    best = 0.0
    for ref in references:
        sim = embed(prediction) @ embed(ref).T  # (prediction tokens, reference tokens), [CLS] ... [SEP] each
        p, r = sim[1:-1].max(1).values.mean().item(), sim[:, 1:-1].max(0).values.mean().item()
        best = max(best, 2 * p * r / (p + r))
    return best


@pytest.mark.slow
def test_bertscore_equals_a_computation_from_the_hidden_states():
    from lorakit.evaluation.bertscore import bertscore_f1
    preds = ["The man bought a red car yesterday.", "They talk about the weekend trip.", "", "Same words here."]
    refs = [["A man purchased a car.", "Yesterday he bought a red car from the dealer."],
            ["#Person1# and #Person2# plan a trip for the weekend."], ["Anything."], ["Same words here."]]
    got = bertscore_f1(preds, refs)
    assert got[2] == 0.0  # empty: scored 0, as bert-score does
    assert got[3] == pytest.approx(1.0, abs=1e-5)
    for i in (0, 1, 3):
        assert got[i] == pytest.approx(_manual_bertscore(preds[i], refs[i]), abs=1e-5)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny("llama", root / "llama")
    data = write_dialogues(root / "d.jsonl", n=24)
    r = recipe(root, model=str(model), task="summarize", data=str(data), split=[0.6, 0.2, 0.2], epochs=1, name="tiny")
    out = root / "out"
    # the regex cells fail when they train (it selects no layer): the others finish, and the sweep exits 1
    assert main(["sweep", r, "--out", str(out), "--grid", "r=2,4", "--grid", "targets=attention,re:.*nothing.*,mlp"]) == 1
    return root, r, out


@pytest.mark.slow
def test_sweep_table_is_every_cells_own_run_and_eval(swept):
    from lorakit.evaluation.bertscore import bertscore_f1
    from lorakit.models.loading import load_model
    root, _, out = swept
    res = json.loads((out / "sweep.json").read_text())
    cells = [(r["cell"]["r"], r["cell"]["targets"]) for r in res["rows"]]
    assert cells == [(r, t) for r in ("2", "4") for t in ("attention", "re:.*nothing.*", "mlp")]
    failed = [r for r in res["rows"] if "failed" in r]
    assert [r["cell"]["targets"] for r in failed] == ["re:.*nothing.*"] * 2  # listed with the reason, others ran
    assert "select no linear layer" in failed[0]["failed"]
    md = (out / "sweep.md").read_text()
    for row in res["rows"]:
        if "failed" in row:
            continue
        run = out / f"r={row['cell']['r']}_targets={row['cell']['targets']}"
        info, ev = (json.loads((run / f).read_text()) for f in ("run.json", "eval.json"))
        assert row["metrics"] == ev["metrics"]["lora"] and row["trainable"] == info["parameters"]["trainable"]
        names = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
        model, _ = load_model(str(root / "llama"), "summarize")
        add_lora(model, LoRAConfig(r=int(row["cell"]["r"]), targets=names[row["cell"]["targets"]]))
        assert row["trainable"] == parameter_report(model).trainable
        assert f"| {row['cell']['r']} | {row['cell']['targets']} | {row['trainable']:,} |" in md
        # BERTScore: the row's mean is the mean of the per-example scores, which are the generations' own
        samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
        assert row["metrics"]["bertscore_f1"] == pytest.approx(sum(s["bertscore_f1 lora"] for s in samples) / len(samples))
        assert [s["bertscore_f1 lora"] for s in samples] == pytest.approx(
            bertscore_f1([s["lora"] for s in samples], [s["references"] for s in samples]), abs=1e-6)
        assert ev["bertscore"]["model"] == "sentence-transformers/all-MiniLM-L6-v2" and ev["bertscore"]["layer"] == 6
    first = json.loads((out / "r=2_targets=attention" / "eval.json").read_text())
    assert "base" in first["metrics"] and res["bases"][0]["metrics"]["base"] == first["metrics"]["base"]
    assert "base" not in json.loads((out / "r=4_targets=mlp" / "eval.json").read_text())["metrics"]  # scored once
    ran = [r for r in res["rows"] if "gain" in r]
    best = max(ran, key=lambda r: r["gain"])
    assert res["best"] == f"r={best['cell']['r']}_targets={best['cell']['targets']}" and f"**{res['best']}**" in md
    for r in ran:
        assert r["gain"] == pytest.approx(r["metrics"]["rouge1"] - first["metrics"]["base"]["rouge1"])
    assert (out / "sweep.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_second_sweep_keeps_finished_cells_and_refuses_changed_settings(swept, capsys):
    root, r, out = swept
    cell = out / "r=2_targets=mlp"
    stamps = {f: (cell / f).stat().st_mtime_ns for f in ("run.json", "eval.json")}
    (out / "r=4_targets=mlp" / "eval.json").unlink()  # trained, never scored: only the evaluation runs again
    trained_at = (out / "r=4_targets=mlp" / "run.json").stat().st_mtime_ns
    assert main(["sweep", r, "--out", str(out), "--grid", "r=2,4", "--grid", "targets=attention,mlp"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier with these settings: kept") == 3
    assert {f: (cell / f).stat().st_mtime_ns for f in stamps} == stamps
    assert (out / "r=4_targets=mlp" / "run.json").stat().st_mtime_ns == trained_at
    assert (out / "r=4_targets=mlp" / "eval.json").is_file()
    assert main(["sweep", r, "--out", str(out), "--grid", "r=2", "--grid", "targets=mlp", "--set", "lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "was trained with other settings (lr 0.01 there, 0.5 now)" in err and "--overwrite" in err


def test_an_interrupted_cell_resumes_and_a_changed_one_is_retrained_with_overwrite(tmp_path, monkeypatch):
    import lorakit.evaluation.sweep as sweep_mod
    from lorakit.config.run_config import RunConfig
    calls = []
    monkeypatch.setattr(sweep_mod, "run_lorakit", lambda cmd, log: calls.append(cmd) or None)
    cfg = RunConfig(model="m", data="d.jsonl")
    run = tmp_path / "cell"
    assert sweep_mod.train_cell("rec.yaml", run, cfg, [], False, tmp_path / "log") is None
    (run / "checkpoint").mkdir(parents=True)
    sweep_mod.train_cell("rec.yaml", run, cfg, [], False, tmp_path / "log")
    assert [c[4] for c in calls] == ["--overwrite", "--resume"]
    (run / "run.json").write_text(json.dumps({"config": cfg.to_dict() | {"r": 16}}))
    with pytest.raises(sweep_mod.UserError, match="r 16 there, 8 now"):
        sweep_mod.train_cell("rec.yaml", run, cfg, [], False, tmp_path / "log")
    sweep_mod.train_cell("rec.yaml", run, cfg, [], True, tmp_path / "log")
    assert calls[-1][4] == "--overwrite"
    (run / "run.json").write_text(json.dumps({"config": cfg.to_dict() | {"out": str(run)}}))
    n = len(calls)
    sweep_mod.train_cell("rec.yaml", run, cfg, [], False, tmp_path / "log")
    assert len(calls) == n  # finished with these settings: not trained again
    older = {k: v for k, v in cfg.to_dict().items() if k not in ("dora", "init")}  # a run.json from before the keys
    (run / "run.json").write_text(json.dumps({"config": older}))
    sweep_mod.train_cell("rec.yaml", run, cfg, [], False, tmp_path / "log")
    assert len(calls) == n  # a missing key is its default: the same run


def test_grid_cells_names_and_overrides():
    from lorakit.evaluation.sweep import base_key, cell_name, cell_overrides, grid_cells, parse_grid
    grid = parse_grid(["r=4,8", "targets=q_proj+v_proj,re:.*(q|v)_proj", "max-records=100"])
    cells = grid_cells(grid)
    assert [cell_name(c) for c in cells] == ["r=4_targets=q_proj+v_proj_max_records=100",
                                             "r=4_targets=re-.--q-v-_proj_max_records=100",
                                             "r=8_targets=q_proj+v_proj_max_records=100",
                                             "r=8_targets=re-.--q-v-_proj_max_records=100"]
    assert cell_overrides(cells[0]) == {"r": "4", "targets": "q_proj,v_proj", "max_records": "100"}
    assert cell_overrides(cells[1])["targets"] == ".*(q|v)_proj"  # a regex, as --targets re:... gives
    # a cell's base depends on what the base sees (data size), not on what is trained (rank, targets)
    assert base_key(cells[0]) == base_key(cells[3]) == (("max_records", "100"),)
