"""Tiny random-weight models built locally: no hub, no downloads."""
from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub; set before transformers is imported
# Tests run as on a CPU without bf16 units, so `auto` is fp32 there, the exact path the oracles are compared with; a
# test of bf16 asks for it (precision bf16, --dtype bf16) or sets this back (test_precision.py). Subprocesses inherit.
os.environ["LORAKIT_NATIVE_BF16"] = "0"

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


class MultiHeadAttention(nn.Module):
    def __init__(self, d: int, heads: int, ctx: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.W_query = nn.Linear(d, d, bias=qkv_bias)
        self.W_key = nn.Linear(d, d, bias=qkv_bias)
        self.W_value = nn.Linear(d, d, bias=qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), diagonal=1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, -1).transpose(1, 2) for w in (self.W_query, self.W_key, self.W_value))
        att = (q @ k.transpose(-1, -2)) / k.shape[-1] ** 0.5
        att = att.masked_fill(self.mask[:t, :t], float("-inf")).softmax(-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ctx: int, qkv_bias: bool) -> None:
        super().__init__()
        self.att = MultiHeadAttention(d, heads, ctx, qkv_bias)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.norm1(x))
        return x + self.ff(self.norm2(x))


class GPTModel(nn.Module):
    """The from-scratch GPT-2 of 'Build a LLM from scratch': separate W_query/W_key/W_value, untied out_head."""

    def __init__(self, vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12, heads: int = 12,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(ctx, d)
        self.trf_blocks = nn.Sequential(*[Block(d, heads, ctx, qkv_bias) for _ in range(layers)])
        self.final_norm = nn.LayerNorm(d)
        self.out_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.out_head(self.final_norm(self.trf_blocks(self.tok_emb(idx) + self.pos_emb(pos))))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5}


def tiny_llama_family(kind: str):
    """A Llama-family decoder ("llama", "mistral", "qwen2", "qwen3") of tiny_llama's size: two layers, grouped-query
    attention (4 heads over 2, head_dim 8), random weights; Qwen2 has q/k/v biases, Qwen3 q/k norms."""
    import transformers
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def model_inputs(name: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(0, 128, (2, 7), generator=g)}
    return {"input_ids": ids}


def free_port() -> int:
    """A loopback port nothing listens on now, for a server under test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Give every LoRA B (and A) random values, so an adapter changes the output."""
    from lorakit.engine.registry import lora_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_B:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.1)


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    return request.param, TINY[request.param]()


def word_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer over w0..wN plus specials, built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny(kind: str, path: Path) -> Path:
    """A tiny model of `kind` with a tokenizer, saved as a Hugging Face model directory."""
    TINY[kind]().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def lm_train_steps(model: nn.Module, steps: int, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """A few AdamW steps of language modelling on fixed random tokens; the losses, step by step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """For the bad-input tests: a tiny Llama, recipes for it (spam.yaml, instruct.yaml) and one finished instruct
    run to damage."""
    from lorakit.cli import main
    from test_bad_input import SMS
    from test_train import recipe, write_instruct
    root = tmp_path_factory.mktemp("bad")
    model = save_tiny("llama", root / "llama")
    instruct = write_instruct(root / "a.jsonl", n=24)
    spam = recipe(root, model=str(model), task="classify", data=str(root / "sms.tsv"), max_steps=1, epochs=1,
                  out=str(root / "never-written"))
    (root / "sms.tsv").write_bytes(SMS)
    (root / "spam.yaml").write_text(open(spam).read())
    recipe(root, model=str(model), task="instruct", data=str(instruct), max_steps=1, out=str(root / "never-written"))
    (root / "recipe.yaml").rename(root / "instruct.yaml")
    assert main(["train", str(root / "instruct.yaml"), "--out", str(root / "run")]) == 0
    return root
