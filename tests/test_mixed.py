"""One batch, several adapters: row i computes exactly what adapter names[i] computes alone."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, randomize_lora
from lorakit import LoRAConfig, LoRAError, adapters_by_row, add_lora, disable_adapters, merge, set_adapter


@pytest.fixture
def three():
    model = TINY["llama"]()
    for i, name in enumerate(("a", "b", "c")):
        add_lora(model, LoRAConfig(r=2 + i, alpha=8, targets="all-linear"), name)
    randomize_lora(model, seed=1)
    return model.eval()


def alone(model, name, ids):
    if name is None:
        with disable_adapters(model):
            return model(input_ids=ids).logits
    set_adapter(model, name)
    return model(input_ids=ids).logits


@torch.no_grad()
def test_rows_use_their_own_adapter(three):
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    names = ["b", None, "a", "b"]
    expected = torch.cat([alone(three, n, ids[i:i + 1]) for i, n in enumerate(names)])
    merge(three)  # a merged adapter must not leak into the other rows
    with adapters_by_row(three, names):
        got = three(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len({round(float(x), 4) for x in got[:, -1, 0]}) >= 3  # the adapters really differ
    assert all(layer.merged == "b" for layer in three.modules() if hasattr(layer, "merged"))  # put back


@torch.no_grad()
def test_generation_with_mixed_rows_matches_one_adapter_at_a_time(three):
    ids = torch.randint(4, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    names = ["c", "a", "b"]
    separate = []
    for i, n in enumerate(names):
        set_adapter(three, n)
        separate.append(three.generate(input_ids=ids[i:i + 1], **kw))
    with adapters_by_row(three, names):
        mixed = three.generate(input_ids=ids, **kw)
    assert torch.equal(mixed, torch.cat(separate))


def test_mixed_rows_errors(three):
    with pytest.raises(LoRAError, match="no adapter named 'z'"):
        with adapters_by_row(three, ["a", "z"]):
            pass
    with adapters_by_row(three, ["a", "b"]):
        with pytest.raises(LoRAError, match="batch has 3 rows but 2 adapter names"):
            three(input_ids=torch.zeros(3, 4, dtype=torch.long))


@torch.no_grad()
def test_adapter_on_some_layers_only_and_a_new_row_plan_each_time(three):
    """An adapter that targets q_proj only leaves the other layers' rows at base; the stacked per-row weights are
    rebuilt for every adapters_by_row block (and after a weight change between blocks)."""
    add_lora(three, LoRAConfig(r=2, alpha=4, targets=["q_proj"]), "q")
    randomize_lora(three, seed=3)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    for names in (["q", "a"], ["c", "q"], [None, "q"]):
        expected = torch.cat([alone(three, n, ids[i:i + 1]) for i, n in enumerate(names)])
        with adapters_by_row(three, names):
            torch.testing.assert_close(three(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    randomize_lora(three, seed=5)
    expected = torch.cat([alone(three, n, ids[i:i + 1]) for i, n in enumerate(["a", "q"])])
    with adapters_by_row(three, ["a", "q"]):
        torch.testing.assert_close(three(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
