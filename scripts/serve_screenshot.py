"""Serve a run, chat with it through the web page in headless Chromium, and save a screenshot.

    .venv/bin/python scripts/serve_screenshot.py --run RUN [--prompt TEXT] [--out docs/img/serve.png]

A real browser (Debian's chromium, driven by Playwright without `playwright install`) types the prompt,
sends it, waits for the streamed reply to finish and photographs the page; the reply is also printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from ternchat.eval.serve import Generator, Limits, create_app  # noqa: E402
from ternchat.runs import load_model_and_tokenizer, run_stage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--prompt", default="Write a Rust function that returns the largest element of a slice.")
    parser.add_argument("--temperature", default="0")
    parser.add_argument("--max-tokens", default="96")
    parser.add_argument("--out", type=Path, default=Path("docs/img/serve.png"))
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium: install Debian's (apt-get install chromium) or run scripts/setup.sh --test")
    model, tok = load_model_and_tokenizer(args.run)
    engine = Generator(model, tok, run_stage(args.run) != "pretrain", args.run.name, Limits())
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 620})
        page.goto(f"http://127.0.0.1:{args.port}/")
        page.fill("#temperature", args.temperature)
        page.fill("#max-tokens", args.max_tokens)
        page.fill("#input", args.prompt)
        page.click("#send")
        page.wait_for_selector(".assistant .status", timeout=300_000)
        print(page.locator(".assistant").first.inner_text())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    server.should_exit = True
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
