"""SIGTERM and SIGINT for a command that stops on its own terms (`lrexp train` after a checkpoint, `lrexp
grid` after its running cell): the first signal is kept and handed to a callback, later ones are ignored. A
Ctrl-C in a terminal reaches a grid and its cell alike and the grid forwards it too, so a cell sees it twice,
and a second signal must not cut short the checkpoint or the bookkeeping the first one started.
"""

from __future__ import annotations

import signal
from typing import Callable, List, Optional

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
        self._forwards: List[Callable[[int], None]] = []

    def forward(self, send: Callable[[int], None]) -> Callable[[], None]:
        """Pass the signal on with `send` too (a child process's `send_signal`), also when it came already;
        returns the function that stops passing it on. A grid running several cells forwards to each."""
        self._forwards.append(send)
        if self.received is not None:
            send(self.received)
        return lambda: self._forwards.remove(send)

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
        for send in list(self._forwards):
            send(signum)
        if self.on_signal is not None:
            self.on_signal(signum)
