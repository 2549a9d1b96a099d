"""Helpers of the server tests: test images, multipart forms, a free port, a live uvicorn server."""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic(kind: str, index: int, defective: bool = False) -> np.ndarray:
    from moleflow.data.synthetic import render_sample

    return render_sample(kind, "test", index, defective=defective)[0]


def files(*named: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for a multipart form with one ``image`` field per ``(name, bytes)``."""
    return [("image", (name, data, "application/octet-stream")) for name, data in named]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: (size, mtime_ns, sha256); equal before and after = nothing was written."""
    out = {".": (-1, root.stat().st_mtime_ns, "dir")}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = (
                path.stat().st_size,
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        else:
            out[str(path.relative_to(root))] = (-1, path.stat().st_mtime_ns, "dir")
    return out


@contextlib.contextmanager
def live_server(app, port: int) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:``port`` in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
