"""A DPO training step on SmolLM2-135M (fp32): lorakit against TRL's DPOTrainer + PEFT, in the same run, on the
same HH-RLHF pairs (the same token ids: lorakit's chat-template encoding, given to TRL as its tokenised columns),
the same LoRA (r=16 on the 7 projections), batch, AdamW and clipping, the base as the reference.

    python bench/dpo.py [--steps 6] [--batch 8] [--cases trl,trl-pre,lorakit,lorakit-pre]
Cases: trl, TRL's own loop (trainer.train(), each step timed by a callback), the reference computed in each step
(the adapter disabled); lorakit, the preference objective of `lorakit train` (one packed row per pair, the prompt
once; the LM head on the replies' tokens only); -pre: the reference log-probabilities precomputed before training
(TRL's precompute_ref_log_probs, lorakit's precompute_reference), their time reported apart. Each case runs alone in
its own process (its peak RSS), then all in one process, a step each in turn (the speed ratios; TRL's step there is
its compute_loss, backward and AdamW step on its own collated batch). Writes bench/results/dpo.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import (PROJECTIONS, bench_args, machine, print_table, reset_peak_rss, run_cases, step_timer,  # noqa: E402
                  vm_hwm_gb)

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf" / "harmless-base-test.jsonl"


def encoded_pairs(a: argparse.Namespace) -> list:
    """The first (warmup + steps) x batch usable HH pairs, encoded as `lorakit train` encodes them."""
    from lorakit.data.preferences import PreferenceData, encode_pairs
    from lorakit.models.loading import load_tokenizer, resolve_spec
    tok = load_tokenizer(resolve_spec("smollm2")[0])
    n = (a.warmup + a.steps) * a.batch
    return encode_pairs(PreferenceData.load(HH, strict=False).pairs[:n], tok, a.max_length, "chat")


def trained_ids(reply) -> list[int]:
    """A reply's tokens up to its last trained one: what TRL, which scores every completion token, must be given."""
    from lorakit.data.examples import IGNORE
    last = max(i for i, lab in enumerate(reply.labels) if lab != IGNORE)
    return reply.input_ids[:last + 1]


def lorakit_model():
    from lorakit import LoRAConfig, add_lora, load_model
    from lorakit.models.kernels import fuse_swiglu
    model, tok = load_model("smollm2", "instruct")
    add_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0, targets=PROJECTIONS))
    fuse_swiglu(model)  # as `lorakit train` does
    return model.train(), tok


class LorakitCase:
    """`lorakit train`'s preference step: the objective, backward, clipping, AdamW."""

    def __init__(self, pairs: list, a: argparse.Namespace, pre: bool) -> None:
        import torch
        from lorakit.data.preferences import pair_batch
        from lorakit.training.preference import preference_objective, reference_logps
        self.model, tok = lorakit_model()
        self.pairs, self.batch, self.pad = pairs, a.batch, tok.pad_token_id
        self.objective = preference_objective(type("Cfg", (), {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0,
                                                               "simpo_gamma": 0.5}), None)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.precompute_s = 0.0
        if pre:
            t0 = time.perf_counter()
            values = reference_logps(self.model, pairs, lambda ps: pair_batch(ps, self.pad), a.batch, None, "cpu")
            for pair, (c, r) in zip(pairs, values.tolist()):
                pair.reference = (c, r)
            self.precompute_s = time.perf_counter() - t0
        self.collate = lambda ps: pair_batch(ps, self.pad)

    def step(self, i: int) -> tuple[float, float]:
        batch = self.collate(self.pairs[i * self.batch:(i + 1) * self.batch])
        t0 = time.perf_counter()
        loss, _ = self.objective(self.model, batch)
        return applied(self.model, self.opt, loss, t0)


def applied(model, opt, loss, t0: float) -> tuple[float, float]:
    """Backward, clip to 1.0 and step, as both trainers do: (seconds since t0, the loss)."""
    import torch
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def trl_trainer(pairs: list, a: argparse.Namespace, pre: bool, callbacks=()):
    """TRL's DPOTrainer on SmolLM2 with a PEFT LoRA, its data the pairs' token ids, in order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from lorakit import load_model
    model, tok = load_model("smollm2", "instruct")
    columns = {"prompt_ids": [p.prompt_ids for p in pairs], "chosen_ids": [trained_ids(p.chosen) for p in pairs],
               "rejected_ids": [trained_ids(p.rejected) for p in pairs]}
    stub = Dataset.from_dict({"prompt": ["x"] * len(pairs), "chosen": [" y"] * len(pairs),
                              "rejected": [" z"] * len(pairs)})
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     optim="adamw_torch", logging_steps=1, save_strategy="no", disable_tqdm=True, beta=0.1,
                     loss_type=["sigmoid"], max_length=4 * a.max_length, dataloader_num_workers=0, seed=0,
                     precompute_ref_log_probs=pre)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=stub, processing_class=tok, peft_config=lora,
                         callbacks=list(callbacks))
    trainer.train_dataset = Dataset.from_dict(columns)  # the same token ids as lorakit's
    trainer._get_train_sampler = lambda *args, **kw: torch.utils.data.SequentialSampler(trainer.train_dataset)
    precompute_s = 0.0
    if pre:
        t0 = time.perf_counter()
        trainer.train_dataset = trainer._precompute_ref_logps(trainer.train_dataset, "train",
                                                              args.precompute_ref_batch_size or a.batch)
        trainer.precompute_ref_logps = True
        precompute_s = time.perf_counter() - t0
    return trainer, precompute_s


class TrlTurnCase:
    """TRL's step for the turns: compute_loss on its collated batch, backward, clipping, AdamW."""

    def __init__(self, pairs: list, a: argparse.Namespace, pre: bool) -> None:
        import torch
        self.trainer, self.precompute_s = trl_trainer(pairs, a, pre)
        self.model = self.trainer.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.batch = a.batch

    def step(self, i: int) -> tuple[float, float]:
        rows = [self.trainer.train_dataset[j] for j in range(i * self.batch, (i + 1) * self.batch)]
        batch = self.trainer.data_collator(rows)
        t0 = time.perf_counter()
        loss = self.trainer.compute_loss(self.model, batch)
        return applied(self.model, self.opt, loss, t0)


def trl_alone(case: str, a: argparse.Namespace, pairs: list) -> dict:
    """TRL's own loop: trainer.train(), each step timed from its start to the end of its optimizer step."""
    times, losses = [], []
    trainer, precompute_s = trl_trainer(pairs, a, case.endswith("-pre"), [step_timer(times, losses, a.warmup)])
    reset_peak_rss()
    trainer.train()
    return result(case, a, pairs, times, losses, precompute_s)


def result(case: str, a: argparse.Namespace, pairs: list, times: list[float], losses: list[float],
           precompute_s: float) -> dict:
    step = statistics.median(times)
    tokens = statistics.mean(len(p) for p in pairs)
    return {"case": case, "step_s": step, "pairs_per_s": a.batch / step, "step_peak_rss_gb": vm_hwm_gb(),
            "precompute_s": precompute_s, "losses": losses, "step_times": times, "lorakit_tokens_per_pair": tokens,
            "trl_tokens_per_pair": statistics.mean(2 * len(p.prompt_ids) + len(trained_ids(p.chosen))
                                                   + len(trained_ids(p.rejected)) for p in pairs)}


def run_case(case: str, a: argparse.Namespace) -> dict:
    pairs = encoded_pairs(a)
    if case.startswith("trl"):
        return trl_alone(case, a, pairs)
    runner = LorakitCase(pairs, a, case.endswith("-pre"))
    reset_peak_rss()
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        dt, loss = runner.step(i)
        losses.append(loss)
        if i >= a.warmup:
            times.append(dt)
        print(f"  {case} step {i + 1}/{a.warmup + a.steps}: {dt:.2f}s loss {loss:.4f}", file=sys.stderr, flush=True)
    return result(case, a, pairs, times, losses, runner.precompute_s)


def turns(cases: list[str], a: argparse.Namespace) -> dict[str, float]:
    """{case: median step seconds} with every case in this one process, a step each in turn."""
    import torch
    torch.set_num_threads(2)
    runners = {case: (TrlTurnCase if case.startswith("trl") else LorakitCase)(encoded_pairs(a), a,
                                                                              case.endswith("-pre"))
               for case in cases}
    times = {case: [] for case in cases}
    for i in range(a.warmup + a.steps):
        for case, runner in runners.items():
            dt, loss = runner.step(i)
            if i >= a.warmup:
                times[case].append(dt)
            print(f"  turns {i + 1}/{a.warmup + a.steps} {case}: {dt:.2f}s loss {loss:.4f}", file=sys.stderr,
                  flush=True)
    return {case: statistics.median(t) for case, t in times.items()}


def main() -> None:
    ap = bench_args(__doc__, "dpo", "trl,trl-pre,lorakit,lorakit-pre", steps=6)
    ap.set_defaults(batch=8)
    ap.add_argument("--max-length", type=int, default=384)
    results, a = run_cases(ap, __file__, run_case)
    if results is None:
        return
    steps = turns([r["case"] for r in results], a)
    for r in results:
        r["turns_step_s"] = steps[r["case"]]
        r["turns_pairs_per_s"] = a.batch / steps[r["case"]]
    for r in results:
        ref = next(x for x in results if x["case"] == ("trl-pre" if r["case"].endswith("-pre") else "trl"))
        best_trl = max((x for x in results if x["case"].startswith("trl")), key=lambda x: x["turns_pairs_per_s"])
        r["speed_vs_trl_same_reference"] = r["turns_pairs_per_s"] / ref["turns_pairs_per_s"]
        r["speed_vs_trl_best"] = r["turns_pairs_per_s"] / best_trl["turns_pairs_per_s"]
        r["memory_vs_trl"] = r["step_peak_rss_gb"] / ref["step_peak_rss_gb"]
    print(f"\nDPO, SmolLM2-135M fp32, batch {a.batch} HH pairs (max_length {a.max_length}), r=16 on 7 projections, "
          "AdamW, clipping 1.0, 2 threads")
    print_table(results, [("case", lambda r: r["case"], ""), ("alone s", lambda r: r["step_s"], ".2f"),
                          ("pairs/s", lambda r: r["pairs_per_s"], ".2f"), ("turns s", lambda r: r["turns_step_s"], ".2f"),
                          ("pairs/s", lambda r: r["turns_pairs_per_s"], ".2f"),
                          ("x trl", lambda r: r["speed_vs_trl_same_reference"], ".2f"),
                          ("peak GB", lambda r: r["step_peak_rss_gb"], ".2f"),
                          ("mem x", lambda r: r["memory_vs_trl"], ".2f"),
                          ("precompute s", lambda r: r["precompute_s"], ".1f")])
    print("x trl: pairs/s in turns against TRL with the same reference (computed in the step, or precomputed); "
          "mem x: the training steps' peak RSS, each case alone")
    machine("dpo", a, results)


if __name__ == "__main__":
    main()
