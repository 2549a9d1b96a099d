"""Load test of ``moleflow serve`` on loopback, next to the library's own batch throughput on the same images.

    PYTHONPATH=src python benchmarks/serve_load.py RUN_DIR IMAGE_DIR... --clients 1,4,16 --seconds 30 \
        --json runs/serve_load.json

Starts ``moleflow serve RUN_DIR`` as a subprocess on a free 127.0.0.1 port, then for each client count N
runs N concurrent clients for T seconds (and at most ``--max-requests`` requests), each posting one image
per request, cycling through the images found in IMAGE_DIR (their original file bytes). Reports per N:
requests/s, images/s, client-side p50/p95/p99 latency, errors by status, the server's model calls and
mean batch; and the server's peak resident memory. After the server stops, the library alone:
``Detector.predict`` on the same images from their files (decoding included, as the server does) at
``--batch-size``, in this process. Nothing leaves the machine: the server binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def find_images(dirs: list[Path], limit: int) -> list[Path]:
    from moleflow.cli.predict import collect_inputs

    return [item.path for item in collect_inputs([str(d) for d in dirs])][:limit]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, port: int, extra: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "moleflow", "serve", str(run_dir), "--port", str(port), *extra]
    proc = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not come up in 300 s; see {log_path}")


def run_clients(url: str, payloads: list[tuple[str, bytes]], clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` threads posting one image each per request until ``seconds`` or ``max_requests``."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    issued = 0
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        nonlocal issued
        with httpx.Client(timeout=120) as session:
            i = k
            while time.monotonic() < stop_at:
                with lock:
                    if issued >= max_requests:
                        return
                    issued += 1
                name, data = payloads[i % len(payloads)]
                i += clients
                start = time.perf_counter()
                try:
                    status = str(session.post(url, files=[("image", (name, data))]).status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    ok = int(statuses.get("200", 0))
    return {
        "clients": clients,
        "seconds": wall,
        "requests": sum(statuses.values()),
        "ok": ok,
        "errors": {s: n for s, n in statuses.items() if s != "200"},
        "images_per_s": ok / wall,
        "latency_ms": {f"p{p}": float(np.percentile(ms, p)) for p in (50, 95, 99)} if ok else {},
    }


def library_throughput(run_dir: Path, images: list[Path], batch_size: int, repeats: int) -> dict:
    """``Detector.predict`` on the image files (decoding included, as the server does) and on the decoded
    arrays (the model alone), after one warm-up batch."""
    import torch

    from moleflow.data.io import read_image
    from moleflow.detector import Detector
    from moleflow.serve.service import peak_rss_mib

    detector = Detector.load(run_dir, progress=False)
    detector.predict(images[:batch_size], batch_size=batch_size)
    paths = images * repeats
    start = time.perf_counter()
    detector.predict(paths, batch_size=batch_size)
    from_files = time.perf_counter() - start
    arrays = [read_image(p) for p in images] * repeats
    start = time.perf_counter()
    detector.predict(arrays, batch_size=batch_size)
    from_arrays = time.perf_counter() - start
    return {
        "images": len(paths),
        "batch_size": batch_size,
        "seconds": from_files,
        "images_per_s": len(paths) / from_files,
        "decoded_images_per_s": len(paths) / from_arrays,
        "torch_threads": torch.get_num_threads(),
        "process_peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("image_dirs", nargs="+", type=Path, metavar="IMAGE_DIR")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds per client count (default 30)")
    parser.add_argument("--max-requests", type=int, default=3000, help="requests per client count at most")
    parser.add_argument("--max-images", type=int, default=64, help="distinct images to cycle through")
    parser.add_argument("--batch-size", type=int, default=16, help="the library's batch (and the server's --max-batch)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images for the library timing")
    parser.add_argument("--server-args", default="", help="extra `moleflow serve` options, e.g. '--max-wait-ms 5'")
    parser.add_argument("--heatmap", action="store_true", help="ask for each heatmap (?heatmap=base64, as the page does)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    load_before = os.getloadavg()  # other work on the machine shifts every number here: recorded
    images = find_images(args.image_dirs, args.max_images)
    if not images:
        raise SystemExit(f"no images in {args.image_dirs}")
    payloads = [(p.name, p.read_bytes()) for p in images]
    port = free_port()
    log_path = (args.json or Path("serve_load.json")).with_suffix(".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server_args = ["--max-batch", str(args.batch_size), *args.server_args.split()]
    proc = start_server(args.run_dir, port, server_args, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        idle = httpx.get(f"{url}/metrics").json()["memory"]["peak_rss_mib"]
        levels = []
        for n in (int(c) for c in args.clients.split(",")):
            before = httpx.get(f"{url}/metrics").json()["model"]
            target = f"{url}/predict" + ("?heatmap=base64" if args.heatmap else "")
            level = run_clients(target, payloads, n, args.seconds, args.max_requests)
            after = httpx.get(f"{url}/metrics").json()
            calls = after["model"]["calls"] - before["calls"]
            level["model_calls"] = calls
            level["mean_batch"] = (after["model"]["images"] - before["images"]) / calls if calls else 0.0
            level["server_peak_rss_mib"] = after["memory"]["peak_rss_mib"]
            levels.append(level)
            print(json.dumps(level), flush=True)
        server_metrics = httpx.get(f"{url}/metrics").json()
    finally:
        proc.terminate()
        proc.wait(60)
    library = library_throughput(args.run_dir, images, args.batch_size, args.repeats)
    print(json.dumps({"library": library}), flush=True)
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "images": len(images),
        "image_sizes": sorted({Image.open(p).size for p in images}),
        "server_args": server_args,
        "heatmap": args.heatmap,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "server_idle_rss_mib": idle,
        "levels": levels,
        "server_metrics": server_metrics,
        "library": library,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    print(markdown(out))


def markdown(out: dict) -> str:
    rows = [
        "| clients | requests | images/s | p50 ms | p95 ms | p99 ms | errors | model calls | mean batch | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in out["levels"]:
        lat = lv["latency_ms"]
        rows.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['images_per_s']:.2f} | {lat.get('p50', 0):.0f} | "
            f"{lat.get('p95', 0):.0f} | {lat.get('p99', 0):.0f} | {sum(lv['errors'].values())} | {lv['model_calls']} | "
            f"{lv['mean_batch']:.1f} | {lv['server_peak_rss_mib']:.0f} |"
        )
    lib = out["library"]
    rows.append(
        f"\nlibrary Detector.predict, batch {lib['batch_size']}: {lib['images_per_s']:.2f} images/s from files "
        f"({lib['images']} images in {lib['seconds']:.1f} s), {lib['decoded_images_per_s']:.2f} images/s on decoded arrays"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
