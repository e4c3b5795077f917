"""Stop on SIGTERM / Ctrl-C at a step boundary, so the loop can checkpoint before it exits."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and stops."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self.signal = signal.Signals(signum).name

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
