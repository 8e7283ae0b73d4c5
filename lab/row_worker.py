"""Log rows computed on a second CPU core, while the training loop goes on with its next steps.

A log row reads the step's residuals and psi for every run and point (lab.log_row.row_sums: ~0.5 ms for
200 runs x 1000 points, ~60 tensor ops), nearly as much as the step itself (~0.75 ms). On a CPU the
population trains with one intra-op thread (lab.trainer), so with `log_every = 1` the rows would double
the training time while a second core sits idle. `Rows` moves them there:

- The row buffers are a small ring of slots in shared memory: a row step writes its e and psi straight
  into the current slot (`Population.terms(keep=True)`, the write it does anyway), the loop copies the
  parameters in and sends the slot's number down a pipe, and takes the next free slot.
- A process forked from the training process (it shares the population's data, copy on write, and needs
  no import or pickling) computes `row_sums` from the slot into a shared output, and sends the slot back.
- At a flush the loop waits for the rows it has sent and reads their sums: the same numbers, from the
  same code on the same data, as the rows computed in the loop (tests/test_row_worker.py).

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
import warnings

import torch

from lab import log_row

# Populations with fewer [run, point] values than this compute their rows in the loop: a row of a
# single run of 1000 points is ~0.15 ms of op overhead, less than the messages and the slot copy cost
# over a whole run, and the fork (~5 ms for the study process) would not pay.
MIN_ELEMENTS = 1 << 15
# The slots together hold at most this many bytes (e and psi, each [N, n, k]); at least two slots, so
# that the step writes one while the worker reads the other (10,000 runs x 1000 points: two slots, 160 MB).
SLOT_BYTES = 64 << 20
MAX_SLOTS = 4
# A worker that sends no answer for this long is taken for dead (a row of 10,000 runs takes ~30 ms).
TIMEOUT_S = 60.0

_REQUEST = struct.Struct("ii")  # slot, output row
_REPLY = struct.Struct("i")  # slot


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

    The loop calls `submit(raw, P)` at each row step, after the step wrote its e and psi into
    `pop.row_e`, `pop.row_psi`, and `collect()` before it reads the rows' sums (raw.sums) at a flush;
    `close()` at the end. At most `capacity` rows may be submitted between two collects.
    """

    def __init__(self, pop, P: torch.Tensor, capacity: int, worker: bool):
        self.pop, self.capacity = pop, capacity
        self.submitted: list[log_row.RawRow] = []
        self.busy: dict[int, int] = {}  # slot -> output row, for the worker and not answered
        self.unsent: list[bytes] = []  # requests not yet written (see submit)
        self.pid = None
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
        self.free = list(range(slots - 1, -1, -1))
        self.batch = max(1, slots // 2)
        self.slot = self.free.pop()
        pop.row_e, pop.row_psi = self.e[self.slot], self.psi[self.slot]
        requests_r, self.requests = os.pipe()
        self.replies, replies_w = os.pipe()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns about fork() in a process with threads: PyTorch's intra-op pool may
                # have threads, and the child uses none of them (one thread, no locks the parent could hold).
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError as exc:  # no process to spare (EAGAIN, ENOMEM): the rows are computed in the loop
            for fd in (requests_r, self.requests, self.replies, replies_w):
                os.close(fd)
            print(f"lab: no log-row worker ({exc}); computing log rows in the training process", file=sys.stderr)
            return
        if pid == 0:  # the worker: never returns into the caller's code
            os.close(self.requests)
            os.close(self.replies)
            _serve(pop, self.e, self.psi, self.P, self.out, requests_r, replies_w)
        os.close(requests_r)
        os.close(replies_w)
        os.set_blocking(self.replies, False)  # reads answers without waiting (select waits where needed)
        self.pid = pid

    def submit(self, raw: log_row.RawRow, P: torch.Tensor) -> None:
        """The row step `raw` (its sums still None): its sums are computed now, or sent to the worker."""
        if len(self.submitted) >= self.capacity:
            raise RuntimeError(f"more than {self.capacity} rows submitted without a collect")
        i = len(self.submitted)
        self.submitted.append(raw)
        if self.pid is None:
            raw.sums = log_row.row_sums(self.pop, self.pop.row_e, self.pop.row_psi, P)
            return
        slot = self.slot
        self.P[slot].copy_(P)
        self.busy[slot] = i
        self.unsent.append(_REQUEST.pack(slot, i))
        # Requests go in pairs where the ring allows: each wakes the sleeping worker, and a wake-up across
        # cores costs as much as a few hundred tensor ops' overhead on a virtual machine (measured).
        if len(self.unsent) >= self.batch or not self.free:
            self._send()
        while not self.free and self.pid is not None:
            self._answers(wait=True)
        if self.pid is not None:
            self.slot = self.free.pop()
            self.pop.row_e, self.pop.row_psi = self.e[self.slot], self.psi[self.slot]

    def collect(self) -> list[log_row.RawRow]:
        """The rows submitted since the last collect, each with its sums [row_sums_size, N]."""
        self._send()
        while self.busy and self.pid is not None:
            self._answers(wait=True)
        if self.pid is not None:
            for i, raw in enumerate(self.submitted):
                raw.sums = self.out[i].clone()
        rows, self.submitted = self.submitted, []
        return rows

    def close(self) -> None:
        """End the worker (it exits when its pipe closes) and reap it."""
        if self.pid is None:
            return
        os.close(self.requests)
        os.close(self.replies)
        os.waitpid(self.pid, 0)
        self.pid = None

    def _send(self) -> None:
        if not self.unsent or self.pid is None:
            return
        try:
            os.write(self.requests, b"".join(self.unsent))  # atomic: at most 4 requests of 8 bytes
        except OSError:  # BrokenPipeError: the worker is gone
            self._fall_back("it closed its pipe")
        self.unsent.clear()

    def _answers(self, wait: bool) -> None:
        """Free the slots the worker has answered; with `wait`, block until at least one answer comes."""
        while True:
            try:
                data = os.read(self.replies, _REPLY.size * len(self.busy))  # whole answers: each write is atomic
                break
            except BlockingIOError:  # no answer yet
                if not wait:
                    return
                if not select.select([self.replies], [], [], TIMEOUT_S)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    self._fall_back(f"it sent no answer for {TIMEOUT_S:g} s")
                    return
        if not data:
            self._fall_back("it exited")
            return
        for (slot,) in _REPLY.iter_unpack(data):
            del self.busy[slot]
            self.free.append(slot)

    def _fall_back(self, why: str) -> None:
        """The worker is gone: compute the rows it had not answered from their slots, and the rest in the loop."""
        os.close(self.requests)
        os.close(self.replies)
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        print(f"lab: the log-row worker stopped ({why}, wait status {status}); computing log rows in the "
              f"training process", file=sys.stderr)
        for slot, i in sorted(self.busy.items(), key=lambda item: item[1]):
            self.out[i] = log_row.row_sums(self.pop, self.e[slot], self.psi[slot], self.P[slot])
        for i, raw in enumerate(self.submitted):
            raw.sums = self.out[i].clone()
        self.busy.clear()


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


def _serve(pop, e, psi, P, out, requests: int, replies: int) -> None:
    """The worker's loop: a slot and an output row in, the row's sums out, until the pipe closes."""
    status = 1
    try:
        # Ctrl-C and a terminal's SIGTERM reach the whole process group; the training process handles
        # them (it stops at a flush, after collecting its rows), and this process ends when it closes the pipe.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        torch.set_num_threads(1)
        _release_free_memory()
        while True:
            request = os.read(requests, _REQUEST.size)  # whole requests: each write is atomic
            if not request:
                break
            slot, i = _REQUEST.unpack(request)
            out[i] = log_row.row_sums(pop, e[slot], psi[slot], P[slot])
            os.write(replies, _REPLY.pack(slot))
        status = 0
    except BaseException as exc:  # noqa: BLE001 (one line, then the training process computes the rows)
        print(f"lab: log-row worker: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        os._exit(status)
