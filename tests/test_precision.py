"""bf16 where the hardware computes it (engine/precision.py): the frozen base stored in bf16 once, adapters and their
optimizer state in fp32, the LoRA Function computing in bf16. Checked against PEFT on a bf16-loaded model (what PEFT
users do on GPUs) and against fp32; `auto` by a faked capability check."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import TINY, randomize_lora, save_tiny
from test_train import recipe, write_instruct

from lorakit import LoRAConfig, add_lora
from lorakit.config import ConfigError, RunConfig, validate
from lorakit.engine import precision, store_frozen


def loss_and_grads(model, seed: int = 0) -> tuple[float, dict]:
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.eval()  # no model dropout (GPT-2 has some); gradients still flow, the adapter's dropout is 0
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def lorakit_model(kind: str, dtype: torch.dtype, **lora) -> torch.nn.Module:
    model = add_lora(TINY[kind](), LoRAConfig(r=4, dropout=0.0, **lora))
    randomize_lora(model)
    return store_frozen(model, dtype)


def test_store_frozen_casts_only_what_is_frozen():
    """Frozen weights bf16 (tied ones still tied), LoRA fp32, buffers (rotary frequencies) as they were."""
    model = lorakit_model("llama", torch.bfloat16)
    model.config.tie_word_embeddings = True
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    tied = add_lora(TINY["gpt2"](), LoRAConfig(r=4))
    store_frozen(tied, torch.bfloat16)
    assert tied.lm_head.weight is tied.transformer.wte.weight and tied.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind,lora", [("llama", {}), ("gpt2", {}), ("llama", {"dora": True}),
                                       ("llama", {"quantize": "nf4", "quant_backend": "torch"})])
def test_bf16_training_step_against_peft_on_a_bf16_model_and_fp32(kind, lora):
    """The loss and adapter gradients of one step with the base in bf16 are PEFT's on the same bf16 base (which
    computes the LoRA term in fp32) to bf16 rounding, and the fp32 step's to a few percent; gradients come back
    fp32, and the adapter trains through the fused Function (no fp32 copy of the activations)."""
    from peft import LoraConfig, get_peft_model
    loss, grads = loss_and_grads(lorakit_model(kind, torch.bfloat16, **lora))
    loss32, grads32 = loss_and_grads(lorakit_model(kind, torch.float32, **lora))
    assert abs(loss - loss32) < 0.01 * abs(loss32)
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        assert (g - grads32[name]).norm() <= 0.1 * grads32[name].norm(), name
    if lora.get("quantize"):
        return
    targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj"]
    ours = lorakit_model(kind, torch.bfloat16, targets=targets, **lora)
    base = TINY[kind]().to(torch.bfloat16)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                           use_dora=bool(lora.get("dora")), fan_in_fan_out=kind == "gpt2"))
    copy_adapters(ours, peft)
    loss, grads = loss_and_grads(ours)
    peft_loss, peft_grads = loss_and_grads(peft)
    assert abs(loss - peft_loss) < 0.005 * abs(peft_loss)
    for name, g in peft_grads.items():
        mine = grads[lorakit_name(name)]
        assert (mine - g).norm() <= 0.05 * g.norm(), name


def lorakit_name(peft_name: str) -> str:
    """PEFT's name of an adapter tensor as lorakit's model names it."""
    return (peft_name.replace("base_model.model.", "").replace("lora_magnitude_vector", "lora_magnitude")
            .replace(".default.weight", ".default"))


def copy_adapters(ours: torch.nn.Module, peft: torch.nn.Module) -> None:
    """PEFT's adapter values (B made random first, so the adapter matters) into lorakit's model, so both compute
    the same function."""
    mine = dict(ours.named_parameters())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, value in peft.named_parameters():
            if "lora_B" in name:
                value.copy_(torch.randn(value.shape, generator=g) * 0.1)
            if value.requires_grad:
                mine[lorakit_name(name)].copy_(value.reshape(mine[lorakit_name(name)].shape))


@pytest.fixture
def detect(monkeypatch):
    """The capability check as a user's machine runs it (conftest makes the tests' CPU one without bf16 units)."""
    monkeypatch.delenv("LORAKIT_NATIVE_BF16")
    precision.native_bf16.cache_clear()
    precision._slower_note.cache_clear()
    yield
    monkeypatch.undo()  # the real check and the tests' setting back, then nothing cached from this test
    precision.native_bf16.cache_clear()


def test_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch, capsys, detect):
    """auto follows the capability check; an explicit bf16 on a CPU without it runs after one line saying so."""
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": False)
    assert precision.resolve_dtype("auto") == torch.float32
    assert precision.resolve_dtype("bf16") == torch.bfloat16
    assert precision.resolve_dtype("bf16") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("without native bf16 units") == 1 and "slower than fp32" in err
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": True)
    assert precision.resolve_dtype("auto") == torch.bfloat16 and capsys.readouterr().err == ""
    assert precision.resolve_dtype("fp32") == torch.float32


def test_the_real_capability_check_reads_the_cpu_flags(monkeypatch, detect):
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    assert precision.native_bf16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)
    precision.native_bf16.cache_clear()
    monkeypatch.setenv("LORAKIT_NATIVE_BF16", "1")
    assert precision.native_bf16("cpu") and precision.resolve_dtype("auto") == torch.bfloat16
    precision.native_bf16.cache_clear()
    monkeypatch.setenv("LORAKIT_NATIVE_BF16", "0")
    assert not precision.native_bf16("cpu") and precision.resolve_dtype("auto") == torch.float32


def test_precision_config_refuses_what_cannot_mean_anything():
    with pytest.raises(ConfigError, match="method full trains every weight"):
        validate(RunConfig(precision="bf16", method="full"), "r.yaml")
    with pytest.raises(ConfigError, match="choose one of the two"):
        validate(RunConfig(precision="bf16", mixed_precision="fp16"), "r.yaml")
    with pytest.raises(ConfigError, match="precision"):
        validate(RunConfig(precision="fp16"), "r.yaml")


def test_train_in_bf16_saves_fp32_adapters(tmp_path):
    """`lorakit train --precision bf16`: run.json says so, the adapter on disk is fp32 and the loss falls
    (resuming in bf16: test_train's resume test runs in both precisions)."""
    from lorakit.cli import main
    llama = save_tiny("llama", tmp_path / "llama")
    data = write_instruct(tmp_path / "a.jsonl", n=24)
    r = recipe(tmp_path, model=str(llama), task="instruct", data=str(data), max_steps=6)
    assert main(["train", r, "--out", str(tmp_path / "run"), "--precision", "bf16"]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["precision"].startswith("bf16")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert losses[-1] < losses[0]


def test_classification_head_trains_in_fp32_in_a_bf16_model(tmp_path):
    from test_bad_input import SMS

    from lorakit.cli import main
    llama = save_tiny("llama", tmp_path / "llama")
    (tmp_path / "sms.tsv").write_bytes(SMS)
    r = recipe(tmp_path, model=str(llama), task="classify", data=str(tmp_path / "sms.tsv"), max_steps=2)
    assert main(["train", r, "--out", str(tmp_path / "run"), "--precision", "bf16"]) == 0
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    heads = [k for k in saved if "score" in k]
    assert heads and all(saved[k].dtype == torch.float32 for k in heads)


def test_generate_and_eval_in_bf16_and_int8_say_so_and_record_it(tmp_path, capsys):
    """--dtype bf16 and int8 for generate and eval: the line that says what was used, eval.json's dtype, and the
    answers of a trained adapter close to fp32's (a loss within 2%)."""
    from lorakit.cli import main
    llama = save_tiny("llama", tmp_path / "llama")
    data = write_instruct(tmp_path / "a.jsonl", n=24)
    r = recipe(tmp_path, model=str(llama), task="instruct", data=str(data), max_steps=4, split=[0.7, 0.1, 0.2])
    assert main(["train", r, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    adapter = str(tmp_path / "run" / "adapter")
    for dtype in ("bf16", "int8"):
        assert main(["generate", "--adapter", adapter, "--prompt", "w5 w6", "--max-new-tokens", "6", "--dtype", dtype,
                     "--no-stream"]) == 0
        out = capsys.readouterr()
        assert f"generating in {dtype}" in out.err and out.out.strip()
    results = {}
    for dtype in ("fp32", "bf16", "int8"):
        assert main(["eval", str(tmp_path / "run"), "--dtype", dtype, "--no-base"]) == 0
        assert f"evaluating in {dtype}" in capsys.readouterr().out
        results[dtype] = json.loads((tmp_path / "run" / "eval.json").read_text())
        assert results[dtype]["dtype"] == dtype
    loss = {d: r["metrics"][next(iter(r["metrics"]))]["loss"] for d, r in results.items()}
    assert abs(loss["bf16"] - loss["fp32"]) <= 0.02 * loss["fp32"]
    assert abs(loss["int8"] - loss["fp32"]) <= 0.02 * loss["fp32"]


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_the_server_and_the_page_cast_adapters_loaded_later(tmp_path, dtype):
    """open_served and the page's Workbench with dtype bf16 or int8: the base and every adapter in bf16 (int8: every
    linear's weight int8 codes), and one the page loads later too (fp32 weights beside bf16 ones would keep the
    engine off the C++ step)."""
    from lorakit.cli import main
    from lorakit.inference.precision import dtype_of
    from lorakit.serve import Workbench
    from lorakit.serve.api import open_served
    llama = save_tiny("llama", tmp_path / "llama")
    data = write_instruct(tmp_path / "a.jsonl", n=16)
    r = recipe(tmp_path, model=str(llama), task="instruct", data=str(data), max_steps=1)
    assert main(["train", r, "--out", str(tmp_path / "run")]) == 0
    served = open_served(str(llama), [str(tmp_path / "run")], dtype=dtype)
    assert served.dtype == dtype == dtype_of(served.engine.model)
    assert {p.dtype for p in served.engine.model.parameters()} == {torch.bfloat16}
    page = Workbench(str(llama), [], dtype=dtype)
    page.add(tmp_path / "run")
    assert page.adapters and {p.dtype for p in page.model.parameters()} == {torch.bfloat16}
    assert dtype_of(page.model) == dtype
    assert {p.dtype for p in Workbench(str(llama), [str(tmp_path / "run")]).model.parameters()} == {torch.float32}


def test_a_packed_bf16_weight_multiplies_as_f_linear_and_is_dropped_when_the_weight_changes():
    """DenseBase.pack: from PACKED_ROWS rows (inference) the product runs on oneDNN's packed copy, within a bf16
    rounding of F.linear (the same bits where oneDNN picks the same kernel); fewer rows, or with autograd, F.linear
    itself; a weight changed in place (a merge) or an fp32 one is never multiplied by a stale or packed copy."""
    import torch.nn.functional as F

    from lorakit.engine.frozen_base import PACKED_ROWS, DenseBase, packing_supported
    if not packing_supported():
        pytest.skip("this PyTorch has no oneDNN bf16")
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 64, generator=g).bfloat16(), requires_grad=False)
    bias = torch.randn(96, generator=g).bfloat16()
    base = DenseBase(weight)
    assert base.pack() and base.packed() is not None
    x = torch.randn(3, PACKED_ROWS, 64, generator=g).bfloat16()
    with torch.no_grad():
        assert base.takes_packed(x) and not base.takes_packed(x[:1, :PACKED_ROWS - 1])
        got, want = base.matmul(x, bias).float(), F.linear(x, weight, bias).float()
        assert bool(((got - want).abs() <= 2 ** -7 * want.abs() + 1e-2).all())
        assert torch.equal(base.matmul(x[:1, :3], bias), F.linear(x[:1, :3], weight, bias))
        weight.add_(1)  # merged into
        assert base.packed() is None and torch.equal(base.matmul(x, bias), F.linear(x, weight, bias))
    assert not base.takes_packed(x)  # autograd on: never the packed copy
    assert not DenseBase(torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)).pack()


def test_pack_for_batches_packs_every_bf16_linear_and_changes_no_prompt_beyond_rounding():
    """precision.pack_for_batches on a bf16 Llama with LoRA: the LM head and every adapted linear get packed copies,
    no module or state-dict key changes (the copies sit beside the plain linears, and an adapter added later adopts
    oneDNN's; the head's, in AMX's layout for fp32 logits, it lays out anew); a
    batch of prompts' logits stay within bf16 rounding of the unpacked model's; a merge drops the merged layer's
    copy; an fp32 model is left as it is."""
    from lorakit.engine import lora_layers
    from lorakit.engine.frozen_base import DenseBase, packed_linear, packing_supported
    from lorakit.inference.compiled_step import extension
    from lorakit.inference.decode import _left_padded
    from lorakit.inference.precision import cast_for_inference, pack_for_batches
    if not packing_supported():
        pytest.skip("this PyTorch has no oneDNN bf16")
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize_lora(model)
    assert pack_for_batches(model) == []  # fp32: nothing to pack
    cast_for_inference(model, "bf16")
    ids, mask = _left_padded([[5, 9, 3, 7, 2, 8, 4, 6, 10, 12, 3], [3, 3, 14, 20, 21]] * 4, 0, "cpu")
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits.float()
        assert pack_for_batches(model) and all(layer.frozen.packed() is not None for _, layer in lora_layers(model))
        ext = extension()  # the head's copy is AMX's layout: none on a CPU without AMX
        assert (packed_linear(model.lm_head) is not None) == (ext is not None and ext.amx_supported())
        after = model(input_ids=ids, attention_mask=mask).logits.float()
    assert (after - before).abs().max() <= 2 ** -6 * before.abs().max()
    assert type(model.lm_head) is torch.nn.Linear and list(model.state_dict()) == keys
    adopted = model.model.layers[0].mlp.up_proj.__dict__["packed_base"]
    add_lora(model, LoRAConfig(r=4, targets=["up_proj", "lm_head"]), "head")
    assert model.model.layers[0].mlp.up_proj.frozen is adopted  # the adapter adopted the packed copy
    # the head's copy is AMX's layout (fp32 logits): the adapter wraps the plain weight, packed at the next call
    assert type(model.lm_head.frozen) is DenseBase and model.lm_head.frozen.packed() is None
    assert pack_for_batches(model) and model.lm_head.frozen.packed() is not None
    layer = next(iter(lora_layers(model)))[1]
    layer.active = "default"
    layer.merge()  # through .data, which moves no version counter: the merge itself drops the copy
    assert layer.frozen.packed() is None


def test_batched_decoding_packs_for_the_call_and_gives_the_memory_back():
    """decode() with PACKED_ROWS rows or more on a bf16 model runs on packed weights during the call (seen from its
    prefill callback) and drops them after; fewer rows never pack."""
    from lorakit.engine import lora_layers
    from lorakit.engine.frozen_base import PACKED_ROWS, packing_supported
    from lorakit.inference import Sampling
    from lorakit.inference.decode import decode
    from lorakit.inference.precision import cast_for_inference
    from lorakit.inference.sampling import Choice
    if not packing_supported():
        pytest.skip("this PyTorch has no oneDNN bf16")
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    cast_for_inference(model, "bf16")
    layer = next(iter(lora_layers(model)))[1]
    seen = []
    prompts = [[5, 9, 3, 7, 2][: 2 + i % 4] for i in range(PACKED_ROWS)]
    for slots in (PACKED_ROWS, PACKED_ROWS - 1):
        made = list(decode(model, prompts, Choice(Sampling(max_new_tokens=3)), set(), 0, slots=slots,
                           on_prefill=lambda _: seen.append(layer.frozen.packed() is not None)))
        assert len(made) == 3 * len(prompts) and layer.frozen.packed_copy is None
    assert seen[0] and not any(seen[1:]) and len(seen) > 2
