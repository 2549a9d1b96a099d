"""Fixtures of the server tests: one detector of the shared tiny run, apps built around it, test images."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(scope="session")
def served_detector(tiny_run):
    """The tiny run's detector, loaded once for every app of these tests (one app runs at a time)."""
    from moleflow.detector import Detector

    detector = Detector.load(tiny_run, progress=False)
    detector.extractor  # noqa: B018 - build the backbone now, once
    return detector


@pytest.fixture
def make_client(served_detector) -> Callable[..., contextlib.AbstractContextManager]:
    """``with make_client(**settings) as client:`` a TestClient of an app around the shared detector."""
    from fastapi.testclient import TestClient

    from moleflow.serve import ServeSettings, build_app
    from moleflow.serve.service import InspectionService

    @contextlib.contextmanager
    def make(**settings) -> Iterator[TestClient]:
        service = InspectionService(served_detector, ServeSettings(**{"warmup": False, **settings}))
        with TestClient(build_app(service)) as client:
            yield client

    return make
