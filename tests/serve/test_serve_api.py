"""The server's endpoints in-process (FastAPI's TestClient): answers equal the library's, every bound and
bad input gets its status and a message naming the file, concurrent requests are batched, a full queue
gets 503 and a slow one 504."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from serve_helpers import files, png, synthetic

from tests.helpers import png_header_only

pytest.importorskip("fastapi", reason="the server tests need the [serve] extra: pip install 'moleflow[serve]'")
pytest.importorskip("httpx", reason="the server tests need httpx (FastAPI's TestClient)")


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_predict_answers_what_the_library_answers_in_upload_order(make_client, served_detector):
    images = {
        "stripes_good.png": synthetic("stripes", 0),
        "stripes_broken.png": synthetic("stripes", 1, defective=True),
        "disc_good.png": synthetic("disc", 2),
        "grid.png": synthetic("grid", 0),  # a product the run never learned
    }
    expected = served_detector.predict(list(images.values()))
    with make_client() as client:
        response = client.post("/predict", files=files(*((n, png(a)) for n, a in images.items())))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["image"] for r in results] == list(images)
    for got, want in zip(results, expected, strict=True):
        assert got["nearest_product"] == want.product and got["verdict"] == want.verdict
        assert got["score"] == pytest.approx(want.score, rel=1e-4)
        assert got["normalized_score"] == pytest.approx(want.normalized_score, rel=1e-4, abs=1e-4)
        assert got["threshold"] == want.threshold and got["image_size"] == [128, 128]
        assert got["routed"] == ("unknown product" if want.unknown else want.product)
        assert "heatmap_png" not in got
    verdicts = {r["image"]: r["verdict"] for r in results}
    assert verdicts["grid.png"] == "unknown product" and results[3]["product"] is None
    assert {r["routed"] for r in results[:3]} == {"stripes", "disc"}


def test_heatmaps_as_base64_in_the_json_or_as_the_png_itself(make_client, served_detector):
    image = synthetic("stripes", 1, defective=True)
    prediction = served_detector.predict(image)[0]
    with make_client() as client:
        as_json = client.post("/predict?heatmap=base64", files=files(("a.png", png(image)))).json()["results"][0]
        response = client.post("/predict?heatmap=png", files=files(("a.png", png(image))))
        two = client.post("/predict?heatmap=png", files=files(("a.png", png(image)), ("b.png", png(image))))
        bogus = client.post("/predict?heatmap=jpeg", files=files(("a.png", png(image))))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert base64.b64decode(as_json["heatmap_png"]) == response.content  # the same PNG both ways
    heat = _decoded(response.content)
    assert heat.shape == (128, 128, 3) and not np.array_equal(heat, image)  # the map over the image
    assert response.headers["x-moleflow-verdict"] == prediction.verdict
    assert response.headers["x-moleflow-product"] == prediction.product
    assert float(response.headers["x-moleflow-score"]) == pytest.approx(prediction.score, rel=1e-4)
    assert two.status_code == 400 and "heatmap=base64" in two.json()["detail"]
    assert bogus.status_code == 422


def test_tasks_health_and_metrics(make_client, served_detector):
    records = served_detector.records
    with make_client(max_images=3, queue_size=5) as client:
        tasks = client.get("/tasks").json()["products"]
        health = client.get("/health").json()
        for _ in range(3):
            assert client.post("/predict", files=files(("a.png", png(synthetic("disc", 0))))).status_code == 200
        assert client.post("/predict", files=files(("x.txt", b"text"))).status_code == 415
        assert (
            client.post("/predict", files=files(*[(f"{i}.png", png(synthetic("disc", i))) for i in range(2)])).status_code
            == 200
        )
        metrics = client.get("/metrics").json()
    assert [t["name"] for t in tasks] == ["stripes", "disc"]
    for row in tasks:
        cal = records[row["name"]].calibration
        assert row["image_threshold"] == cal.image_threshold and row["unknown_threshold"] == cal.unknown_threshold
        assert row["learned_at"] == records[row["name"]].learned_at and row["train_images"] == 16
        assert row["calibration"] == {"method": "holdout", "images": 4}
    assert health["status"] == "ok" and health["products"] == ["stripes", "disc"] and health["device"] == "cpu"
    assert health["limits"]["max_images"] == 3 and health["queue"] == {"depth": 0, "capacity": 5}
    assert metrics["requests"]["by_route"] == {"/tasks": 1, "/health": 1, "/predict": 5}
    assert metrics["requests"]["by_status"] == {"200": 6, "415": 1} and metrics["requests"]["total"] == 7
    assert metrics["errors"] == {"client": 1, "server": 0, "refused_queue_full": 0, "timed_out": 0}
    latency = metrics["predict_latency_ms"]
    assert latency["count"] == 4 and 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert metrics["images"] == 5 and metrics["model"]["images"] == 5 and metrics["model"]["calls"] <= 4
    assert metrics["memory"]["peak_rss_mib"] > 100


def test_bad_uploads_get_a_status_and_a_message_naming_the_file(make_client):
    good = png(synthetic("disc", 0))
    jpeg = io.BytesIO()
    Image.fromarray(synthetic("disc", 1)).save(jpeg, format="JPEG")
    cases = [
        (files(("notes.txt", b"just some text")), 415, "notes.txt is not an image"),
        (files(("empty.png", b"")), 415, "empty.png"),
        (files(("cut.png", good[: len(good) // 2])), 400, "cut.png.*corrupt"),
        (files(("bomb.png", png_header_only(8000, 8000))), 413, "bomb.png is 8000x8000 .* megapixels"),
        (files(("ok.png", good), ("bad.jpg", jpeg.getvalue()[:300])), 400, "bad.jpg"),
        (files(*[(f"{i}.png", good) for i in range(4)]), 413, "more than 3 images"),
    ]
    with make_client(max_images=3, max_megapixels=1.0) as client:
        for form, status, message in cases:
            response = client.post("/predict", files=form)
            assert response.status_code == status, (form[0][1][0], response.text)
            assert re.search(message, response.json()["detail"]), response.json()["detail"]
        no_file = client.post("/predict", data={"image": "part.png"}, files=files())
        assert no_file.status_code in (400, 415)
        text_field = client.post("/predict", data={"image": "part.png"}, files=files(("ok.png", good)))
        assert text_field.status_code == 400 and "'image' is text, not a file" in text_field.json()["detail"]
        as_json = client.post("/predict", json={"image": "part.png"})
        assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["detail"]
        assert client.get("/predict").status_code == 405
        assert client.post("/predict", files=files(("ok.png", good))).status_code == 200  # still serving


def test_the_body_size_bound_holds_with_and_without_a_content_length(make_client):
    big = png(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))  # ~49 KB
    with make_client(max_upload_mb=0.03) as client:  # 31 KB
        declared = client.post("/predict", files=files(("big.png", big)))
        boundary = "b0undary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + big
            + f"\r\n--{boundary}--\r\n".encode()
        )

        def chunks():
            for start in range(0, len(body), 8192):
                yield body[start : start + 8192]

        chunked = client.post(
            "/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        small = client.post("/predict", files=files(("small.png", png(synthetic("disc", 0)))))
    for response in (declared, chunked):
        assert response.status_code == 413 and "larger than the limit of 0 MiB" in response.json()["detail"]
    assert small.status_code == 200


def test_concurrent_requests_are_batched_onto_the_model_and_keep_their_own_answers(make_client, served_detector):
    n = 6
    images = [synthetic("stripes" if i % 2 else "disc", i, defective=i % 3 == 0) for i in range(n)]
    expected = [served_detector.predict(image)[0] for image in images]
    with make_client(max_batch=8, max_wait_ms=400) as client:
        with ThreadPoolExecutor(n) as pool:
            responses = list(
                pool.map(lambda i: client.post("/predict", files=files((f"{i}.png", png(images[i])))), range(n))
            )
        model = client.get("/metrics").json()["model"]
    assert [r.status_code for r in responses] == [200] * n
    for i, response in enumerate(responses):
        (result,) = response.json()["results"]
        assert result["image"] == f"{i}.png" and result["verdict"] == expected[i].verdict
        assert result["score"] == pytest.approx(expected[i].score, rel=1e-4)
    assert model["images"] == n and model["calls"] < n and model["max_batch"] > 1


class _Blocked:
    """Stand-in for ``Detector.predict`` that holds the model worker until released."""

    def __init__(self, predict) -> None:
        self.predict, self.entered, self.release = predict, threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(20)
        return self.predict(*args, **kwargs)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_full_queue_gets_503_and_the_queued_requests_are_still_answered(make_client, served_detector, monkeypatch):
    blocked = _Blocked(served_detector.predict)
    monkeypatch.setattr(served_detector, "predict", blocked)
    form = files(("a.png", png(synthetic("disc", 0))))
    depth = lambda client: client.get("/metrics").json()["queue"]["depth"]  # noqa: E731
    with make_client(queue_size=3, max_images=2, max_batch=1) as client, ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/predict", files=form)
        assert blocked.entered.wait(10)  # the worker holds the first image
        queued = [pool.submit(client.post, "/predict", files=form) for _ in range(2)]
        _wait_for(lambda: depth(client) == 2)
        pair = client.post("/predict", files=form + form)  # 2 + 2 > 3: does not fit as a whole
        queued.append(pool.submit(client.post, "/predict", files=form))  # 2 + 1 fits
        _wait_for(lambda: depth(client) == 3)
        full = client.post("/predict", files=form)  # refused before its body is read
        blocked.release.set()
        answered = [f.result(30) for f in [first, *queued]]
        metrics = client.get("/metrics").json()
    for refused in (pair, full):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "busy: 2 images are waiting for the model (at most 3)" in pair.json()["detail"]
    assert "the queue is full (3 images)" in full.json()["detail"]
    assert [r.status_code for r in answered] == [200] * 4
    assert metrics["errors"]["refused_queue_full"] == 2 and metrics["model"]["images"] == 4


def test_a_request_past_its_timeout_gets_504_and_its_images_leave_the_queue(make_client, served_detector, monkeypatch):
    blocked = _Blocked(served_detector.predict)
    monkeypatch.setattr(served_detector, "predict", blocked)
    form = files(("a.png", png(synthetic("disc", 0))))
    with make_client(request_timeout_s=0.5, max_batch=1) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/predict", files=form)
        assert blocked.entered.wait(10)
        start = time.perf_counter()
        late = client.post("/predict", files=form)
        waited = time.perf_counter() - start
        blocked.release.set()
        assert first.result(30).status_code == 504  # also past its deadline; its model call still finishes
        _wait_for(lambda: client.get("/metrics").json()["model"]["cancelled_images"] == 1)
        after = client.post("/predict", files=form)
        metrics = client.get("/metrics").json()
    assert late.status_code == 504 and "timeout of 0.5 s" in late.json()["detail"] and 0.4 < waited < 5
    assert after.status_code == 200
    assert metrics["errors"]["timed_out"] == 2 and metrics["model"]["images"] == 2  # the late one never ran


def test_a_model_failure_is_a_500_and_the_server_keeps_serving(make_client, served_detector, monkeypatch):
    real = served_detector.predict
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(served_detector, "predict", fails_once)
    form = files(("a.png", png(synthetic("disc", 0))))
    with make_client() as client:
        failed = client.post("/predict", files=form)
        ok = client.post("/predict", files=form)
        health = client.get("/health")
    assert failed.status_code == 500 and "out of memory (simulated)" in failed.json()["detail"]
    assert ok.status_code == 200 and health.json()["status"] == "ok"


def test_the_page_and_its_files_are_served(make_client):
    with make_client() as client:
        page = client.get("/")
        script = client.get("/static/app.js")
        style = client.get("/static/style.css")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text and 'id="products"' in page.text
    assert script.status_code == 200 and "/predict?heatmap=base64" in script.text
    assert style.status_code == 200
