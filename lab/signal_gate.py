"""Signals held back across a few statements that must happen together, then passed on.

The training loop counts a run's update and writes its parameters in two statements (lab.trainer), and
the log-row worker's bookkeeping records a request beside the message that sends it (lab.row_worker). A
Ctrl-C between the two would leave them disagreeing: a step counted whose parameters were never kept,
a row sent that no record knows of. `SignalGate.held()` defers SIGINT and SIGTERM to the end of such a
block; everywhere else they act at once, as they would without it.
"""

from __future__ import annotations

import signal
import threading


class SignalGate:
    """Holds SIGINT and SIGTERM back while a block runs, then passes them on.

    Blocking the signals (pthread_sigmask) is not enough: a mask is per thread, the kernel hands a
    process's signal to any thread that does not block it (PyTorch's intra-op pool has threads), and
    Python then raises KeyboardInterrupt in the main thread at its next bytecode, inside the block
    all the same (seen as a row worker's answers lost in the full test suite). A Python handler always runs in the main
    thread: while `held`, this one notes the signal, and passes it to the handler it replaced when the
    block ends; otherwise it passes signals straight on. Installed from the main thread only (elsewhere
    no signal can interrupt the loop); `restore` puts the replaced handlers back.
    """

    def __init__(self, install: bool = True):
        self.depth, self.caught, self.previous = 0, [], {}
        if install and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.depth:
            self.caught.append(signum)
        else:
            # One stop, not two: a signal held until now (one that came as the block ended, after
            # `depth` fell to 0 but before `__exit__` passed it on) goes with this one, rather than
            # raising again at the end of the next block.
            self.caught.clear()
            self._pass_on(signum, frame)

    def _pass_on(self, signum, frame) -> None:
        handler = self.previous.get(signum, signal.SIG_DFL)
        if callable(handler):
            handler(signum, frame)  # Python's default for SIGINT raises KeyboardInterrupt; lab.study's stops
        elif handler != signal.SIG_IGN:  # SIG_DFL, or None (set outside Python): the default action
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def held(self):
        """`with gate.held():` holds the signals back for the block (nested blocks: until the outermost ends).
        The gate is its own context manager: entered at every row, a generator-based one cost more."""
        return self

    def __enter__(self):
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if not self.depth and self.caught:
            signum = self.caught[-1]
            self.caught.clear()
            self._pass_on(signum, None)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) == self._on_signal:  # (unless someone replaced it since)
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous = {}
