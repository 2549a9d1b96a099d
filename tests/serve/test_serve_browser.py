"""The operator's page in a real headless browser (Debian's chromium driven by Playwright): upload a normal
and a defective image, check what the page shows against the library's own predictions, save a screenshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import free_port, live_server, synthetic

CHROMIUM = Path(os.environ.get("MOLEFLOW_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason=f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run installs it)"
)


def _pick(detector, candidates: list[np.ndarray], verdict: str) -> np.ndarray:
    """The first candidate the library itself judges ``verdict`` (the page must then show the same)."""
    for image, prediction in zip(candidates, detector.predict(candidates), strict=True):
        if prediction.verdict == verdict:
            return image
    raise AssertionError(f"none of {len(candidates)} candidate images is {verdict} for the tiny run")


def _damaged(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[32:96, 40:88] = 0  # a large black patch: a defect no normal render has
    return out


def test_the_page_shows_verdict_product_score_and_heatmap_per_image(served_detector, tmp_path):
    from playwright.sync_api import sync_playwright

    from moleflow.serve import ServeSettings, build_app
    from moleflow.serve.service import InspectionService

    normal = _pick(served_detector, [synthetic(k, i) for i in range(6) for k in ("stripes", "disc")], "normal")
    broken = [synthetic(k, i, defective=True) for i in range(1, 12, 2) for k in ("stripes", "disc")]
    defective = _pick(served_detector, broken + [_damaged(synthetic(k, 0)) for k in ("stripes", "disc")], "anomalous")
    paths = [tmp_path / "normal_part.png", tmp_path / "defective_part.png"]
    for path, image in zip(paths, (normal, defective), strict=True):
        Image.fromarray(image).save(path)
    expected = {p.name: pred for p, pred in zip(paths, served_detector.predict([normal, defective]), strict=True)}

    app = build_app(InspectionService(served_detector, ServeSettings(warmup=False)))
    with live_server(app, free_port()) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#products tbody tr').length === 2", timeout=30_000)
        products = page.eval_on_selector_all("#products tbody tr", "rows => rows.map(r => r.dataset.product)")
        page.set_input_files("#files", [str(p) for p in paths])
        page.wait_for_function(
            "document.querySelectorAll('.card').length === 2 && !document.querySelector('.card.pending')"
            " && [...document.querySelectorAll('img.heatmap')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=60_000,
        )
        cards = page.eval_on_selector_all(
            ".card",
            """cards => cards.map(c => ({
                image: c.dataset.image, classes: [...c.classList], badge: c.querySelector('.badge').textContent,
                product: c.querySelector('.product').textContent, score: c.querySelector('.score').textContent,
                fill: parseFloat(c.querySelector('.fill').style.width),
                heatmap: c.querySelector('img.heatmap').naturalWidth, error: c.querySelector('.error').hidden,
            }))""",
        )
        summary = page.text_content("#summary")
        page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
        browser.close()
    if os.environ.get("MOLEFLOW_SCREENSHOT_DIR"):  # to refresh a committed figure by hand
        shutil.copy(tmp_path / "serve_page.png", Path(os.environ["MOLEFLOW_SCREENSHOT_DIR"]) / "serve_page_tiny.png")

    assert problems == []
    assert products == ["stripes", "disc"]
    assert [c["image"] for c in cards] == [p.name for p in paths]  # cards in upload order
    for card in cards:
        want = expected[card["image"]]
        assert card["badge"] == want.verdict and want.verdict in card["classes"] and card["error"]
        assert card["product"] == want.product and card["heatmap"] == 128
        assert card["fill"] == pytest.approx(100 * min(2.0, max(0.0, want.normalized_score)) / 2, abs=0.1)
        assert card["score"].endswith("(above)" if want.normalized_score > 1 else "(below)")
    assert [expected[c["image"]].verdict for c in cards] == ["normal", "anomalous"]
    assert summary == "2 image(s): 1 normal, 1 anomalous, 0 unknown product"
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000
