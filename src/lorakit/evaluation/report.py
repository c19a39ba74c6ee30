"""Showing an evaluation: a table in the terminal, eval.png, and a self-contained report.html."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _metric_names(result: dict) -> list[str]:
    first = next(iter(result["metrics"].values()))
    return [k for k, v in first.items() if isinstance(v, (int, float))]


def bertscore_note(result: dict) -> str | None:
    """Which encoder and layer made the BERTScores (they are comparable only with scores made the same way)."""
    setup = result.get("bertscore")
    if not setup:
        return None
    on_samples = result.get("sample_bertscore_f1")
    scores = (" on the sample generations: " + ", ".join(f"{k} {v:.4f}" for k, v in on_samples.items())
              if on_samples else "")
    return (f"BERTScore F1{scores} ({setup['model']}, layer {setup['layer']}, "
            f"{'idf' if setup['idf'] else 'no idf'}, {'rescaled' if setup['baseline_rescaled'] else 'not rescaled'}; "
            "comparable only with scores from the same encoder and layer)")


def print_table(result: dict) -> None:
    names = _metric_names(result)
    print(f"\n{result['run']}: {result['model']}, task {result['task']}, {result['test_examples']:,} test examples")
    widths = [max(12, len(n) + 2) for n in names]
    print(f"{'':<22}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for row, values in result["metrics"].items():
        print(f"{row:<22}" + "".join(f"{values[n]:>{w}.4f}" for n, w in zip(names, widths)))
    for k, g in (result.get("gains") or {}).items():
        rel = f"{100 * g['relative']:+.1f}%" if g["relative"] is not None else "n/a"
        print(f"gain {k:<17}{g['absolute']:>+12.4f} ({rel})")
    key, rows, tuned = result["primary"], result["metrics"], result.get("tuned", "lora")
    others = ", ".join(f"{name} {v[key]:.4f}" for name, v in rows.items() if name != tuned)
    if note := bertscore_note(result):
        print(note)
    print(f"\ntest {key}: {tuned} {rows[tuned][key]:.4f}" + (f" vs {others}" if others else ""))


def plot_eval(result: dict, path: Path) -> None:
    """Confusion matrices (classify) or base-versus-LoRA bars (summarize, instruct)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["metrics"]
    if result["task"] == "classify":
        shown = [r for r in rows if "confusion" in rows[r] and r != "majority class"]
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.4), squeeze=False)
        axes = axes[0]
        labels = result["labels"]
        for ax, name in zip(axes, shown):
            cm = rows[name]["confusion"]
            ax.imshow(cm, cmap="Blues")
            for i, row in enumerate(cm):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", color="black")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{name}\nacc {rows[name]['accuracy']:.4f}", fontsize=9)
    else:
        names = [n for n in _metric_names(result) if n != "perplexity"]
        fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 3.6))
        width = 0.8 / len(rows)
        for i, (row, values) in enumerate(rows.items()):
            xs = [j + i * width for j in range(len(names))]
            bars = ax.bar(xs, [values[n] for n in names], width, label=row)
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))], names)
        ax.legend()
        ax.set_title(f"{result['run']}: " + " vs ".join(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _img(path: Path) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _cell(v) -> str:
    if isinstance(v, list):
        v = "\n".join(f"[{i + 1}] {x}" for i, x in enumerate(v))
    return f"<td>{html.escape(str(v))}</td>"


def write_report(run_dir: Path, result: dict, samples: list[dict], n_samples: int = 8,
                 out_dir: Path | None = None) -> Path:
    """report.html: metrics, loss and evaluation plots, the run's parameter report, side-by-side examples (into
    out_dir, default the run directory)."""
    out_dir = out_dir or run_dir
    plot_eval(result, out_dir / "eval.png")
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    names = _metric_names(result)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><th>{html.escape(r)}</th>" + "".join(f"<td>{v[n]:.4f}</td>" for n in names) + "</tr>"
                   for r, v in result["metrics"].items())
    gains = "".join(f"<tr><th>{html.escape(k)}</th><td>{g['absolute']:+.4f}</td><td>"
                    + (f"{100 * g['relative']:+.1f}%" if g["relative"] is not None else "n/a") + "</td></tr>"
                    for k, g in (result.get("gains") or {}).items())
    cols = list(samples[0]) if samples else []
    examples = "".join("<tr>" + "".join(_cell(s[c]) for c in cols) + "</tr>" for s in samples[:n_samples])
    params = run.get("parameters", {})
    timings = run.get("timings", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lorakit report: {html.escape(result['run'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;white-space:pre-wrap;font-size:14px}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(result['run'])}</h1>
<p>model <b>{html.escape(result['model'])}</b>, task <b>{html.escape(result['task'])}</b>,
{result['test_examples']:,} test examples, evaluated in {result['seconds']:.0f} s.</p>
<p>trainable {params.get('trainable', 0):,} / {params.get('total', 0):,} parameters
({100 * params.get('fraction', 0):.2f}%); training {timings.get('train_s', 0):.0f} s,
{timings.get('steps', 0)} steps, {timings.get('tokens_per_s', 0):.0f} tokens/s.</p>
<h2>Metrics</h2><table><tr><th></th>{head}</tr>{body}</table>
{f'<p>{html.escape(note)}</p>' if (note := bertscore_note(result)) else ''}
{f'<h2>Gain of {html.escape(result.get("tuned", "lora"))} over base</h2><table><tr><th></th><th>absolute</th><th>relative</th></tr>{gains}</table>' if gains else ''}
<h2>Plots</h2>{_img(out_dir / 'eval.png')}{_img(run_dir / 'loss.png')}
<h2>Examples, side by side</h2><table><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in cols)}</tr>{examples}</table>
</body></html>
"""
    out = out_dir / "report.html"
    out.write_text(page)
    return out
