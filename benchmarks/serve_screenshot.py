"""A screenshot of the operator's page with real images, for the README (headless Debian chromium).

    PYTHONPATH=src python benchmarks/serve_screenshot.py runs/serve_bench \
        ../shared/datasets/hazelnut_toy/hazelnut/test/good/000.png \
        ../shared/datasets/hazelnut_toy/hazelnut/test/colour/000.png --out docs/figures/serve_page.png

Starts ``moleflow serve RUN_DIR`` on a free loopback port, opens the page, uploads the images, waits for
every card and heatmap, and saves a full-page screenshot; prints what each card shows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from serve_load import free_port, start_server

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = start_server(args.run_dir, port, [], Path(tempfile.mkdtemp()) / "server.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 760})
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_function("document.querySelectorAll('#products tbody tr').length > 0", timeout=60_000)
            page.set_input_files("#files", [str(p) for p in args.images])
            page.wait_for_function(
                f"document.querySelectorAll('.card').length === {len(args.images)}"
                " && !document.querySelector('.card.pending')"
                " && [...document.querySelectorAll('img')].every(i => i.complete)",
                timeout=300_000,
            )
            cards = page.eval_on_selector_all(
                ".card",
                "cards => cards.map(c => [c.dataset.image, c.querySelector('.badge').textContent,"
                " c.querySelector('.product').textContent, c.querySelector('.score').textContent])",
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(cards, indent=1))
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
