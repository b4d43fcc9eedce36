"""SIGTERM as Ctrl-C for the long training loops, so `kill`, `docker stop` or a batch scheduler ending a
job leaves a resumable state, as Ctrl-C does. (A job started with `nohup ... &` from a script ignores
SIGINT, so SIGTERM is the way to stop it cleanly.)"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block a SIGTERM raises KeyboardInterrupt in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        logger.warning("SIGTERM received: saving a resumable state and stopping")
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
