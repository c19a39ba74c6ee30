"""A generative evaluation's generation, old path against new, on a trained run (the measurement behind #21's
DialogSum target): transformers' `generate` over batches of 16 length-sorted prompts, against lorakit's decode
loop (static KV cache, continuous batching over 16 rows), for the adapted model (merged) and the base (adapter
off), greedy, the run's eval settings; ROUGE of each against the references. Cases take turns, the order reversed
in each round. Writes bench/results/generate-eval.json. With --dtypes fp32,bf16,int8 the cases are instead the
decode loop with the weights in each dtype (`--dtype`, inference/precision.py), adapted (unmerged) and base: ROUGE and
time of each against fp32.

    python bench/generate_eval.py RUN_DIR [--records 400] [--rounds 1] [--dtypes fp32,bf16,int8 --out ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lorakit.models.trained import load_trained  # noqa: E402
from lorakit.evaluation.runs import machine  # noqa: E402
from lorakit.evaluation.generative import _prompts  # noqa: E402
from lorakit.evaluation.metrics import rouge  # noqa: E402
from lorakit.evaluation.evaluate import run_config  # noqa: E402
from lorakit.inference.sampling import Sampling  # noqa: E402
from lorakit.inference.generation import generate, merged  # noqa: E402
from lorakit.engine.inject import disable_adapters  # noqa: E402
from lorakit.inference.precision import cast_for_inference  # noqa: E402
from lorakit.data.pipeline import load_splits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dtypes", help="e.g. fp32,bf16: the decode loop in each dtype instead of the engines")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate-eval.json"))
    args = ap.parse_args()
    cfg = run_config(Path(args.run))
    cfg.max_eval_records = args.records
    test = load_splits(cfg).test
    model, tok, _ = load_trained(Path(args.run) / "adapter", model=cfg.model)
    prompts = _prompts(model, tok, test, cfg)
    references = [e.references for e in test]
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens)
    models = {"fp32": model}
    for dtype in args.dtypes.split(",") if args.dtypes else []:
        if dtype != "fp32":
            models[dtype] = copy.deepcopy(model)
            cast_for_inference(models[dtype], dtype)
    if args.dtypes:
        cases = [(dtype, which) for dtype in args.dtypes.split(",") for which in ("adapted", "base")]
    else:
        cases = [(engine, which) for engine in ("transformers", "auto") for which in ("adapted", "base")]
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for engine, which in (cases if r % 2 == 0 else cases[::-1]):
            if args.dtypes:  # the decode loop in that dtype; the adapter unmerged (as the server runs it)
                name, m, engine = f"decode loop {engine}: {which}", models[engine], "auto"
                context = disable_adapters(m) if which == "base" else merged(m, False)
            else:
                name = f"{'transformers generate, batches of 16' if engine == 'transformers' else 'decode loop'}: {which}"
                m = model
                context = merged(model) if which == "adapted" else disable_adapters(model)
            t0 = time.perf_counter()
            with context:
                texts = generate(m, tok, prompts, sampling, cfg.template, progress=name, engine=engine)
            seconds = time.perf_counter() - t0
            results.setdefault(name, []).append({"seconds": seconds, **rouge(texts, references)})
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    out = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "run": cfg.name, "records": len(prompts),
           "max_new_tokens": cfg.max_new_tokens, "machine": machine(), "cases": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
