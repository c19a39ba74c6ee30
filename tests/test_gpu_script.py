"""bench/gpu.py, the GPU figures' one command, prepared before any GPU is lent: every part runs at toy sizes on the
CPU (--smoke) and writes its JSON; on a GPU it refuses nothing it needs."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_part_of_the_gpu_script_runs_at_toy_sizes(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["parts"]) == {"steps", "qlora", "generate", "tests"} and summary["smoke"]
    steps = json.loads((tmp_path / "steps.json").read_text())
    ran = {r["case"] for r in steps["rows"] if "tokens_per_s" in r}
    assert {"peft", "peft-trainer", "lorakit", "lorakit-label"} <= ran
    assert steps["summary"]["speed_vs_peft_trainer"] > 0
    qlora = json.loads((tmp_path / "qlora.json").read_text())
    assert qlora["qlora"]["loss_fell"] and qlora["lora-bf16"]["loss_fell"]
    assert qlora["qlora"]["merge_max_abs_diff"] < 1e-3
    generate = json.loads((tmp_path / "generate.json").read_text())
    assert [r["batch"] for r in generate["rows"]] == [1, 4] and all(r["same_text"] == r["rows"]
                                                                     for r in generate["rows"])
    tests = json.loads((tmp_path / "tests.json").read_text())
    assert tests["returncode"] == 0 and re.match(r"3(/\d+)? tests collected", tests["summary"])
