"""Log rows computed on a second CPU core, while the training loop goes on with its next steps.

A log row reads the step's residuals and psi for every run and point (lab.log_row.row_sums: ~0.5 ms for
200 runs x 1000 points, ~60 tensor ops), nearly as much as the step itself (~0.75 ms). On a CPU the
population trains with one intra-op thread (lab.trainer), so with `log_every = 1` the rows would double
the training time while a second core sits idle. `Rows` moves them there:

- The row buffers are a small ring of slots in shared memory: a row step writes its e and psi straight
  into the current slot (`Population.terms(keep=True)`, the writes it does anyway), but for what the
  worker derives more cheaply than the step writes it (below); the loop copies the parameters in, sends (slot, row index) down a pipe, and takes the next slot no unanswered row holds.
  Where psi is a few ops of e (mse, rmse, mae, huber, quantile, expectile: `Population.psi_derived`),
  the step writes none: a cold write of psi cost the step more than deriving it costs the worker. A
  line model's step writes no e either (`Population.e_derived`): the worker recomputes it from the
  slot's parameters with the step's own ops, into its own memory.
- A process forked from the training process (it shares the population's data, copy on write, and needs
  no import or pickling) computes `row_sums` from the slot (deriving what the step left out)
  into the row's place in a shared output, and sends the row index back. At a histogram step it also
  computes the row's histograms (log_row.row_histograms, ~3 ms for 200 runs: more than a row's sums)
  into the slot's histogram buffer, which the loop copies out when the answer comes.
- At a flush the loop waits for the rows it has sent and reads their sums: the same numbers, from the
  same code on the same data, as the rows computed in the loop (tests/test_row_worker.py).

What it costs: one core's worth of the rows' work, moved, not saved; the fork (~10 ms); the worker's
private memory (15-25 MB for 200 runs, 250-650 MB for 10,000, measured by scripts/bench: mostly old copies of
pages the training process wrote after the fork, so it moves with where that process's heap reuse falls); and in the training process one page fault for each
page it writes first after the fork (copy on write): 20,000-70,000 for the 200-run study, up to 0.3 s of
system time on the 2-core machine (measured with getrusage; it varies from run to run).

Threads would not do: the row is dozens of small ops whose Python overhead holds the GIL, and a row in a
thread made a step as slow as the row in the loop (measured: every-step study 4.0-5.1 s, 4.4 s in the
loop). A forked process is what PyTorch's DataLoader uses for its workers on Linux, for the same reason.

Where no second core, no fork (macOS, Windows), a GPU (its ops are asynchronous anyway) or too small a
population makes a worker not worth it, `Rows` computes each row in the loop: one code path for the
sums either way. If the worker dies or stops answering, the rows it had not returned are computed in the
loop from their slots, which stay untouched until answered, and the rest of the training follows suit:
one line on stderr says so, and no row is lost.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import select
import signal
import struct
import sys
import time
import warnings

import torch

from lab import log_row
from lab.signal_gate import SignalGate

# Populations with fewer [run, point] values than this compute their rows in the loop: a row of a
# single run of 1000 points is ~0.15 ms of op overhead, less than the messages and the slot copy cost
# over a whole run, and the fork (~10 ms for the study process) would not pay.
MIN_ELEMENTS = 1 << 15
# The slots together hold at most this many bytes (e and psi, each [N, n, k]); at least two slots, so
# that the step writes one while the worker reads the other (10,000 runs x 1000 points: two slots, 160 MB).
SLOT_BYTES = 64 << 20
MAX_SLOTS = 4
# A worker that sends no answer for this long is taken for dead (a row of 10,000 runs takes ~30 ms).
TIMEOUT_S = 60.0

_REQUEST = struct.Struct("iii")  # slot, row index (its row of `out`), 1 where the row has histograms
_REPLY = struct.Struct("i")  # row index


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_pays(device: torch.device, elements: int, rows: int) -> bool:
    """Whether a population of `elements` [run, point, output] values that logs `rows` rows gets a worker:
    on a CPU with a second core, where fork is safe with PyTorch (Linux), for a population big enough.
    The environment variable LAB_ROW_WORKER=0 keeps every row in the training process (a core kept
    free for something else); LAB_ROW_WORKER=1 starts a worker wherever one can run."""
    possible = device.type == "cpu" and sys.platform == "linux" and hasattr(os, "fork") and rows >= 2
    choice = os.environ.get("LAB_ROW_WORKER", "")
    if choice in ("0", "1"):
        return possible and choice == "1"
    return possible and _cores() >= 2 and elements >= MIN_ELEMENTS


class Rows:
    """Where a population's log rows get their sums: in the loop (`worker=False`) or in a forked worker.

    The loop calls `submit(raw, P, step, histograms, chain)` at each row step, after the step wrote its e
    and psi into `pop.row_e`, `pop.row_psi` (with a worker, only what it does not derive: no e for a line
    model, `Population.e_derived`, no psi of the cheap losses, `Population.psi_derived`), `collect()` at a flush, which returns the rows with their sums (raw.sums)
    and, where asked for, their histograms (raw.histograms: log_row.row_histograms, ~3 ms for 200 runs,
    also off the training core) and their steps, and `clear()` once they are logged; `close()` at the
    end. At most `capacity` rows wait between clears.

    A row counts as submitted once `submit` has registered it, in one list append: a Ctrl-C (a
    KeyboardInterrupt anywhere in the loop) before that leaves no trace of it, after it the row is
    collected like any other. The bookkeeping of requests and answers runs with SIGINT and SIGTERM held
    back (lab.signal_gate), so that an interrupt never splits a message from the record of it.
    """

    def __init__(self, pop, P: torch.Tensor, capacity: int, worker: bool, gate: SignalGate | None = None):
        """gate: the caller's SignalGate (lab.trainer holds its updates with the same one); without one,
        the rows install their own where a worker runs, and `close` removes it."""
        self.pop, self.capacity = pop, capacity
        self.own_gate = gate is None
        # (row, step, slot, histograms wanted, rmse chain [N] or None) since the last collect
        self.rows: list[tuple[log_row.RawRow, int, int | None, bool, torch.Tensor | None]] = []
        self.sent = 0  # rows[:sent] were sent to the worker
        self.histogram_rows = 0  # rows with histograms since the last clear (held until the flush logs them)
        self.done: set[int] = set()  # rows (indices into self.rows) the worker has answered
        self.slot_rows: dict[int, int] = {}  # slot -> the unanswered row that holds it
        self.pid, self.gate = None, SignalGate(install=worker) if gate is None else gate
        if not worker:
            return
        if P.device.type != "cpu":
            raise ValueError(f"a log-row worker shares CPU memory; this population is on {P.device}")
        shape = (*pop.y3.shape[:2], pop.k)
        slot_bytes = 2 * pop.y3.element_size() * shape[0] * shape[1] * shape[2]
        slots = max(2, min(MAX_SLOTS, SLOT_BYTES // max(slot_bytes, 1)))
        dtype = pop.y3.dtype
        self.e = [_shared(shape, dtype) for _ in range(slots)]
        self.psi = [_shared(shape, dtype) for _ in range(slots)]
        self.P = [_shared(P.shape, dtype) for _ in range(slots)]
        self.out = _shared((capacity, log_row.row_sums_size(pop), P.shape[0]), dtype)
        # a histogram row's histograms, per slot: the loop copies them out when the row is answered
        self.hist = [_shared(log_row.row_histograms_shape(pop), dtype) for _ in range(slots)]
        self.chain = [_shared(P.shape[:1], dtype) for _ in range(slots)]  # rmse populations' dL/dm
        self.slots, self.batch = slots, max(1, slots // 2)
        self.slot = 0  # where the next row step writes
        pop.row_e, pop.row_psi = self.e[0], self.psi[0]
        derive_in_reader(pop)  # the steps leave out what the worker derives
        requests_r, self.requests = os.pipe()
        self.replies, replies_w = os.pipe()
        try:
            with warnings.catch_warnings(), self.gate.held():
                # Python 3.12+ warns about fork() in a process with threads: PyTorch's intra-op pool may
                # have threads, and the child uses none of them (one thread, no locks the parent could hold).
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
                if pid == 0:  # the worker (signals held back by the gate): never returns into the caller's code
                    _serve(pop, self.e, self.psi, self.P, self.out, self.hist, self.chain, requests_r, replies_w,
                           (self.requests, self.replies))
        except OSError as exc:  # no process to spare (EAGAIN, ENOMEM): the rows are computed in the loop
            pop.psi_derived = pop.e_derived = False
            for fd in (requests_r, self.requests, self.replies, replies_w):
                os.close(fd)
            self._restore_gate()
            print(f"lab: no log-row worker ({exc}); computing log rows in the training process", file=sys.stderr)
            return
        os.close(requests_r)
        os.close(replies_w)
        os.set_blocking(self.replies, False)  # reads answers without waiting (select waits where needed)
        self.pid = pid

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def first_step(self) -> int | None:
        return self.rows[0][1] if self.rows else None

    def submit(self, raw: log_row.RawRow, P: torch.Tensor, step: int, histograms: bool = False,
               chain: torch.Tensor | None = None) -> None:
        """The row step `raw` (its sums still None) at `step`: its sums (and with `histograms`, its
        histograms; chain: the rmse runs' dL/dm [N] or None) are computed now, or by the worker."""
        if len(self.rows) >= self.capacity:
            raise RuntimeError(f"more than {self.capacity} rows submitted without a clear")
        self.histogram_rows += histograms
        if self.pid is None:
            raw.sums, raw.histograms = _compute(self.pop, self.pop.row_e, self.pop.row_psi, P, histograms, chain)
            self.rows.append((raw, step, None, histograms, chain))
            return
        self.P[self.slot].copy_(P)
        if histograms and chain is not None:
            self.chain[self.slot].copy_(chain)
            chain = self.chain[self.slot]
        with self.gate.held():
            self.slot_rows[self.slot] = len(self.rows)
            self.rows.append((raw, step, self.slot, histograms, chain))  # from here on the row is the worker's
            # Requests go in pairs where the ring allows: each wakes the sleeping worker, and a wake-up
            # across cores costs as much as a few hundred tensor ops' overhead on a virtual machine.
            if len(self.rows) - self.sent >= self.batch or len(self.slot_rows) == self.slots:
                self._send()
        while self.pid is not None and len(self.slot_rows) == self.slots:  # every slot holds an unanswered row
            self._wait()
        if self.pid is not None:
            self.slot = self._free()[0]
            self.pop.row_e, self.pop.row_psi = self.e[self.slot], self.psi[self.slot]

    def collect(self) -> tuple[list[log_row.RawRow], list[int]]:
        """The rows submitted since the last `clear`, each with its sums [row_sums_size, N], and their steps."""
        if self.pid is not None:
            with self.gate.held():
                self._send()
            while self.pid is not None and len(self.done) < len(self.rows):
                self._wait()
        # the answers out of the shared output in one copy (one per row cost ~20 us each, a row every step)
        answered = self.out[:len(self.rows)].clone().unbind(0) if self.done else ()
        for i, (raw, _, slot, histograms, chain) in enumerate(self.rows):
            if i in self.done:  # answered by the worker (its histograms were copied out then)
                raw.sums = answered[i]
            elif raw.sums is None:  # (a fall-back cut short by Ctrl-C)
                raw.sums, raw.histograms = _compute(self.pop, self.e[slot], self.psi[slot], self.P[slot],
                                                    histograms, chain)
        return [r[0] for r in self.rows], [r[1] for r in self.rows]

    def clear(self) -> None:
        """Forget the collected rows, once they are logged (a Ctrl-C before that: they are collected again)."""
        with self.gate.held():
            self.rows, self.sent, self.done, self.slot_rows, self.histogram_rows = [], 0, set(), {}, 0

    def close(self) -> None:
        """End the worker (it exits when its pipe of requests closes) and reap it; where the rows installed
        their own gate, give the signals back first."""
        self._restore_gate()
        self.pop.psi_derived = self.pop.e_derived = False  # (rows after this, in the loop, keep e and psi again)
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        os.close(self.requests)  # the worker answers what it is computing, then reads the end
        deadline = time.monotonic() + TIMEOUT_S
        while os.waitpid(pid, os.WNOHANG) == (0, 0):  # (a worker that hangs must not hang the training)
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.001)
        os.close(self.replies)

    def _restore_gate(self) -> None:
        if self.own_gate:
            self.gate.restore()

    def _free(self) -> list[int]:
        """Slots no unanswered row holds."""
        return [s for s in range(self.slots) if s not in self.slot_rows]

    def _send(self) -> None:
        """Write the requests not yet sent (signals held by the caller)."""
        if self.sent == len(self.rows) or self.pid is None:
            return
        requests = b"".join(_REQUEST.pack(slot, i, histograms)
                            for i, (_, _, slot, histograms, _) in enumerate(self.rows[self.sent:], self.sent))
        try:
            os.write(self.requests, requests)  # atomic: at most `capacity` requests of 12 bytes
        except OSError:  # BrokenPipeError: the worker is gone
            self._fall_back("it closed its pipe")
            return
        self.sent = len(self.rows)

    def _wait(self) -> None:
        """Block until the worker answers, then record its answers; fall back if it is gone or silent."""
        if not select.select([self.replies], [], [], TIMEOUT_S)[0]:  # (a Ctrl-C may end the wait)
            os.kill(self.pid, signal.SIGKILL)
            self._fall_back(f"it sent no answer for {TIMEOUT_S:g} s")
            return
        with self.gate.held():
            try:
                answers = os.read(self.replies, 4096)  # whole answers: each write of one is atomic
            except BlockingIOError:
                return
            if not answers:
                self._fall_back("it exited")
                return
            for (i,) in _REPLY.iter_unpack(answers):
                raw, _, slot, histograms, _ = self.rows[i]
                if histograms:  # out of the slot's buffer before the next row in this slot may overwrite it
                    raw.histograms = self.hist[slot].clone()
                self.done.add(i)
                del self.slot_rows[slot]

    def _fall_back(self, why: str) -> None:
        """The worker is gone: the rows it had not answered are computed in the loop, from their slots, and
        so is every later row (in the slot the step writes now). Interrupted, it leaves rows without
        sums, which `collect` computes from their slots (the training stops: no step writes them)."""
        pid, self.pid = self.pid, None
        os.close(self.requests)
        os.close(self.replies)
        _, status = os.waitpid(pid, 0)
        print(f"lab: the log-row worker stopped ({why}, wait status {status}); computing log rows in the "
              f"training process", file=sys.stderr)
        for i, (raw, _, slot, histograms, chain) in enumerate(self.rows):  # now: the next step may write any slot
            if i not in self.done:
                raw.sums, raw.histograms = _compute(self.pop, self.e[slot], self.psi[slot], self.P[slot],
                                                    histograms, chain)
        self.slot_rows.clear()


def derive_in_reader(pop) -> None:
    """Set what a row's reader, not the step, computes: the psi of the cheap losses (Population.psi_derived)
    and a line model's e (Population.e_derived), both from the step's own functions (the same bits). Not
    for a compiled step, whose rounding the eager derivation need not repeat."""
    # (where no block has a cheap psi, there is nothing to derive: psi stays whole, with no copy per row)
    pop.psi_derived = not pop.compiled and any(blk.cheap_psi for blk in pop.blocks)
    # A line's e: 2-3 ops in the worker (~0.1 ms for 200 runs) against the step's cold writes to the slots
    # (every-step study, 200 runs: ~0.3 s of its ~2.7 s, measured in process).
    pop.e_derived = not pop.compiled and pop.model.kind in ("linear", "constant")


def _compute(pop, e: torch.Tensor, psi: torch.Tensor, P: torch.Tensor, histograms: bool, chain: torch.Tensor | None,
             psi_out: torch.Tensor | None = None, e_out: torch.Tensor | None = None):
    """A row from its slot: (log_row.row_sums, log_row.row_histograms where asked for, else None), e
    recomputed from P (into e_out, else into `e`) and psi derived where the step left them out
    (Population.row_residuals, log_row.row_psi)."""
    if pop.e_derived:
        e = pop.row_residuals(P, e if e_out is None else e_out)
    psi = log_row.row_psi(pop, e, psi, psi_out)
    return log_row.row_sums(pop, e, psi, P), log_row.row_histograms(pop, e, psi, chain) if histograms else None


def _shared(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor in anonymous shared memory (mmap MAP_SHARED): after a fork, what one process writes the
    other reads. Not torch's share_memory_(), which maps files of /dev/shm, a mount that containers
    often keep at 64 MB (two slots of a 10,000-run population take 160 MB)."""
    numel = math.prod(shape)
    buffer = mmap.mmap(-1, max(numel * dtype.itemsize, 1))  # MAP_SHARED | MAP_ANONYMOUS, zeroed
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)  # keeps `buffer` alive


def _release_free_memory() -> None:
    """Give back the free memory of the heap this process inherited (glibc's malloc_trim).

    After the fork every page of the training process is shared, copy on write. The training process
    soon reuses the free parts of its heap (what building the population freed) for its temporaries,
    and each page it writes there would leave its old copy to this process, which never reads it: 585 MB
    of private memory for a 10,000-run study, measured by scripts/bench. Trimmed here, those pages are
    this process's no longer, and the training process writes them without a copy.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: no malloc_trim, the pages stay shared
        pass


def _serve(pop, e, psi, P, out, hist, chain, requests: int, replies: int, parent_ends: tuple[int, int]) -> None:
    """The worker's loop: a slot and a row index in, the row's sums into `out` (and where asked for, its
    histograms into the slot's `hist`), the index back, until the pipe of requests closes. Entered with
    SIGINT and SIGTERM held back (the parent's SignalGate); never returns."""
    status = 1
    try:
        for fd in parent_ends:
            os.close(fd)
        # Ctrl-C and a terminal's SIGTERM reach the whole process group; the training process handles
        # them (it stops at a flush, after collecting its rows), and this process ends when it closes the pipe.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        torch.set_num_threads(1)
        _release_free_memory()
        psi_rows = torch.empty_like(psi[0]) if pop.psi_derived else None  # this process's own, for every row
        e_rows = torch.empty_like(e[0]) if pop.e_derived else None
        while True:
            request = os.read(requests, _REQUEST.size)  # whole requests: each was written whole
            if not request:
                break
            slot, i, histograms = _REQUEST.unpack(request)
            out[i], hists = _compute(pop, e[slot], psi[slot], P[slot], histograms, chain[slot] if pop.root is not None
                                     else None, psi_rows, e_rows)
            if histograms:
                hist[slot].copy_(hists)
            os.write(replies, _REPLY.pack(i))
        status = 0
    except BaseException as exc:  # noqa: BLE001 (one line, then the training process computes the rows)
        print(f"lab: log-row worker: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        os._exit(status)
