"""Progress of a many-product command: one log line per product as it moves on (queued, extracting,
training, calibrating, done, failed with its message) and one bar over all of them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["ProgressBoard"]

log = logging.getLogger("moleflow.parallel")


class ProgressBoard:
    """Lines go through logging (the console and ``train.log``), the bar to stderr unless ``bar=False``."""

    def __init__(self, names: Sequence[str], what: str = "learned", bar: bool = True) -> None:
        self.total = len(names)
        self.what = what
        self.finished = 0
        self.bar = tqdm(total=self.total, desc=f"products {what}", unit="product", disable=not bar, leave=False)

    def stage(self, name: str, stage: str) -> None:
        log.info("%s: %s", name, stage)

    def done(self, name: str, detail: str = "") -> None:
        self.finished += 1
        log.info("%s: done%s [%d/%d %s]", name, f" ({detail})" if detail else "", self.finished, self.total, self.what)
        self.bar.update()

    def failed(self, name: str, message: str) -> None:
        self.finished += 1
        log.error("%s: failed: %s [%d/%d]", name, message, self.finished, self.total)
        self.bar.update()

    @contextlib.contextmanager
    def shown(self) -> Iterator[ProgressBoard]:
        """Log lines printed above the bar instead of through it."""
        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            try:
                yield self
            finally:
                self.bar.close()
