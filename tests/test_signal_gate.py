"""lab.signal_gate: SIGINT and SIGTERM held back across a block and passed on once at its end."""

import signal
import threading

import pytest

from lab.signal_gate import SignalGate


@pytest.fixture
def received():
    """A SIGINT handler that records what reaches it (in place of Python's KeyboardInterrupt), restored after."""
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGINT, previous)


def test_a_signal_in_nested_blocks_reaches_the_handler_once_the_outermost_ends(received):
    gate = SignalGate()
    with gate.held():
        with gate.held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # two Ctrl-Cs in one block: one stop
        assert received == []  # the inner block's end holds it still
    assert received == [signal.SIGINT]
    signal.raise_signal(signal.SIGINT)  # outside a block: straight on
    assert received == [signal.SIGINT] * 2
    gate.restore()
    assert signal.getsignal(signal.SIGINT) is not gate._on_signal


def test_a_signal_held_as_a_block_ends_is_not_passed_on_twice(received):
    # A second signal in the instant after `depth` fell to 0 but before __exit__ passed the first on
    # was passed on at once, and the first again at the end of the next block: two stops for one.
    gate = SignalGate()
    gate.depth = 1
    gate._on_signal(signal.SIGINT, None)  # held
    gate.depth = 0  # the block's end, before it looks at what it held
    gate._on_signal(signal.SIGINT, None)  # the second: passed on, with the first
    with gate.held():
        pass
    assert received == [signal.SIGINT]
    gate.restore()


def test_restore_gives_back_the_handler_it_replaced_unless_replaced_since(received):
    gate = SignalGate()
    assert signal.getsignal(signal.SIGINT) == gate._on_signal
    gate.restore()
    assert signal.getsignal(signal.SIGINT) is not gate._on_signal and signal.getsignal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)
    assert received == [signal.SIGINT]  # the recorder is back
    gate = SignalGate()

    def later(signum, frame):
        return None

    signal.signal(signal.SIGINT, later)  # someone installed theirs after the gate
    gate.restore()
    assert signal.getsignal(signal.SIGINT) is later  # (the fixture puts the original back)


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        gate = SignalGate()
        with gate.held():
            signal.raise_signal(signal.SIGINT)
        gate.restore()  # nothing raised, nothing passed on: SIG_IGN is back
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_it_installs_nothing(received):
    before = signal.getsignal(signal.SIGINT)
    gates = []
    thread = threading.Thread(target=lambda: gates.append(SignalGate()))
    thread.start()
    thread.join()
    assert gates[0].previous == {} and signal.getsignal(signal.SIGINT) is before
    with gates[0].held():  # (held is harmless there: nothing to hold)
        pass
