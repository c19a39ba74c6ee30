"""torch.compile of the decoder blocks (`compile_blocks`, `compile: true`): same loss and gradients as eager."""
from __future__ import annotations

import copy
import json

import torch

from conftest import TINY, randomize_lora
from lorakit import LoRAConfig, add_lora
from lorakit.training.loss import causal_lm_loss
from lorakit.models.kernels import compile_blocks


def _loss_and_grads(model, ids, label_only: bool):
    batch = {"input_ids": ids, "labels": ids}
    loss = causal_lm_loss(model, batch) if label_only else model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_blocks_give_eager_loss_and_gradients():
    eager = add_lora(TINY["llama"](), LoRAConfig(r=4, dropout=0.0))
    randomize_lora(eager)  # with B = 0, A's gradient is exactly zero
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2  # the two LlamaDecoderLayers, not the model
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for label_only in (False, True):
        eager.train(), compiled.train()
        want_loss, want = _loss_and_grads(eager, ids, label_only)
        got_loss, got = _loss_and_grads(compiled, ids, label_only)
        torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
        assert got.keys() == want.keys() and all(g.abs().sum() > 0 for g in want.values())
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5, msg=n)
        eager.zero_grad(), compiled.zero_grad()


def test_compiled_dropout_draws_fresh_masks_and_eval_is_deterministic():
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, dropout=0.3))
    randomize_lora(model)
    reference = copy.deepcopy(model).eval()
    compile_blocks(model)
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert not torch.allclose(a, b)  # a new dropout mask each call
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_train_with_compile(tmp_path):
    from conftest import save_tiny
    from test_train import recipe, write_instruct
    from lorakit.cli import main
    data = write_instruct(tmp_path / "a.jsonl", n=24)
    run = tmp_path / "run"
    r = recipe(tmp_path, model=str(save_tiny("llama", tmp_path / "llama")), task="instruct", data=str(data),
               split=[0.75, 0.25, 0.0], epochs=1, eval_every=2)
    assert main(["train", r, "--out", str(run), "--compile"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["compile"] is True
    losses = [loss for _, loss in info["train_loss"]]
    assert len(losses) == 5 and all(l == l for l in losses)  # 18 rows / batch 4: 5 steps, none NaN
    assert len(info["metrics"]["val_history"]) == 3  # validation ran eagerly in between
