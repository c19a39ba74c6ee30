"""The CUDA paths, run where a GPU is (bench/gpu.py's `tests` part runs `pytest -m cuda` on a lent GPU machine):
the LoRA Function under bf16 autocast, an NF4 base through bitsandbytes' CUDA kernels, the decode loop on the GPU.
Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_lora, tiny_llama

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_lora_function_under_bf16_autocast_follows_fp32():
    """Autocast to bf16 over fp32 weights (Trainer's bf16=True): loss and LoRA gradients within bf16's precision of
    the fp32 ones, the adapter's gradients in fp32."""
    from lorakit import LoRAConfig, add_lora
    model = tiny_llama().cuda()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_lora(model)
    ids = torch.randint(0, 128, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = {}
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[bf16] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, g in grads[False].items():
        assert grads[True][n].dtype == torch.float32
        torch.testing.assert_close(grads[True][n], g, atol=2e-2, rtol=5e-2)


def test_bitsandbytes_nf4_base_on_cuda_equals_its_dequantised_weights():
    pytest.importorskip("bitsandbytes")
    from lorakit import LoRAConfig, add_lora
    from lorakit.engine.registry import lora_layers
    model = tiny_llama().cuda()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear", quantize="nf4", quant_backend="bitsandbytes"))
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad():
        quantised = model(input_ids=ids).logits
        for _, layer in lora_layers(model):
            layer.dequantize_()
        dense = model(input_ids=ids).logits
    torch.testing.assert_close(quantised, dense, atol=1e-3, rtol=1e-3)


def test_decode_loop_on_cuda_gives_generate_tokens():
    from lorakit import LoRAConfig, add_lora
    from lorakit.inference.decode import decode
    from lorakit.inference.sampling import Choice
    model = tiny_llama().cuda().double()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_lora(model)
    model.eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    made = {i: [] for i in range(3)}
    for i, token in decode(model, prompts, Choice.greedy(8), set(), 0, slots=3):
        made[i].append(token)
    for i, prompt in enumerate(prompts):
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=8, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == made[i]
