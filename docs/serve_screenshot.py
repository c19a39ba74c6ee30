"""Make docs/serve.png: `lorakit serve` with real adapters, driven in headless Chromium (Debian's chromium).
    python docs/serve_screenshot.py RUN_DIR [RUN_DIR ...] [--prompt TEXT] [--out docs/serve.png]
"""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

from playwright.sync_api import sync_playwright

from lorakit.serve import Workbench
from lorakit.serve.page import serve

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--prompt", default="Summarize this dialogue:\n#Person1#: Can you help me move on Saturday?\n"
                                         "#Person2#: Sure, what time?\n#Person1#: Nine. I'll buy lunch.")
    ap.add_argument("--max-new-tokens", default="60")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "serve.png"))
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page_app = serve(Workbench(None, a.runs), port=port, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle", timeout=60_000)
            page.locator("#instruction textarea").fill(a.prompt)
            page.get_by_text("sampling").click()
            page.get_by_label("max new tokens").last.fill(a.max_new_tokens)
            page.locator("#generate").click()
            last = f"#stats-{len(a.runs)}"
            page.wait_for_function(f"() => {{ const s = document.querySelector('{last}');"
                                   " return s && s.innerText.includes('tokens/s') && !s.innerText.includes('…'); }",
                                   timeout=600_000)
            page.screenshot(path=a.out, full_page=True)
            browser.close()
    finally:
        page_app.close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
