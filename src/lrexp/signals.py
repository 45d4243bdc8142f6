"""SIGTERM and SIGINT for a command that stops on its own terms (`lrexp train` after a checkpoint, `lrexp
grid` after its running cell): the first signal is kept and handed to a callback, later ones are ignored. A
Ctrl-C in a terminal reaches a grid and its cell alike and the grid forwards it too, so a cell sees it twice,
and a second signal must not cut short the checkpoint or the bookkeeping the first one started.
"""

from __future__ import annotations

import signal
from typing import Callable, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """`with StopSignals(on_signal):` catches SIGTERM and SIGINT; `received` is the first one (or None).
    `on_signal(signum)` runs for the first one, inside the handler: it may raise to stop at once."""

    def __init__(self, on_signal: Optional[Callable[[int], None]] = None) -> None:
        self.on_signal = on_signal
        self.received: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> None:
        """(Re)install the handlers: Lightning's fit puts its own SIGTERM handler in front (see lit/saving.py)."""
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self.on_signal is not None:
            self.on_signal(signum)
