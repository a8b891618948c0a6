"""Stopping on SIGTERM (preemption) and SIGINT (Ctrl-C) at a step boundary, not in the middle of one."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """Set by the first SIGTERM or SIGINT while `stop_on_signals` is active."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While the block runs, the first SIGTERM or SIGINT only records itself in the yielded
    `StopRequest` (the trainer then saves a checkpoint and returns); a second one acts as usual
    (SIGINT raises KeyboardInterrupt, SIGTERM terminates), so a user can still quit at once.
    Outside the main thread (signals cannot be caught there) nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    wanted = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in wanted}

    def record(signum, frame):
        request.signum = signum
        for s in wanted:
            signal.signal(s, previous[s])
        print(
            f"\nreceived {request.name}: stopping after this step with a checkpoint (send it again to quit now)",
            flush=True,
        )

    for s in wanted:
        signal.signal(s, record)
    try:
        yield request
    finally:
        for s in wanted:
            signal.signal(s, previous[s])
