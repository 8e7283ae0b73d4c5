"""Log rows on a forked worker process (lab.row_worker): the same rows as in the training loop, and none
lost when the worker dies, hangs or the training stops.

The expected values are the rows the same population logs with `row_worker_process=False`, where the
loop computes each row itself: the worker runs the same code on the same data, so they must be equal
to the bit, histograms and results included.
"""

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch

from lab import config, data, log_row, metrics, population, row_worker, trainer

needs_fork = pytest.mark.skipif(not (sys.platform == "linux" and hasattr(os, "fork")), reason="a worker needs fork (Linux)")


def _cfgs(model="linear", **extra):
    """A mixed population: 5 losses (quantile at two taus), clean and outlier data, per-run rates."""
    base = {"device": "cpu", "dtype": "float32", "train.figures": False, "data.n": 300, "train.steps": 120,
            "train.log_every": 3, "train.hist_every": 30, "model.kind": model, **extra}
    runs = []
    for i, (loss, kw) in enumerate([("mse", {}), ("mae", {}), ("huber", {"loss.delta": 0.7}), ("log_cosh", {}),
                                    ("quantile", {"loss.tau": 0.2}), ("quantile", {"loss.tau": 0.9}),
                                    ("rmse", {}), ("mse", {"train.normalize_targets": True})]):
        runs.append(config.from_flat({**base, **kw, "loss.name": loss, "seed": i,
                                      "data.kind": ("clean", "outliers")[i % 2], "optim.lr": 0.02 + 0.01 * i}))
    return runs


def _train(cfgs, worker: bool, **kw):
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    blocks, hists = [], []
    res = trainer.train(cfgs, datasets, on_log=blocks.append, on_hist=lambda *a: hists.append(a), flush_every=7,
                        row_worker_process=worker, **kw)
    return res, blocks, hists


def _assert_same(a, b):
    (res_a, blocks_a, hists_a), (res_b, blocks_b, hists_b) = a, b
    assert len(blocks_a) == len(blocks_b) > 1
    for x, y in zip(blocks_a, blocks_b):
        assert np.array_equal(x.steps, y.steps)
        assert np.array_equal(x.values, y.values, equal_nan=True)
    assert len(hists_a) == len(hists_b) > 0
    for x, y in zip(hists_a, hists_b):
        assert x[:2] == y[:2] and all(np.array_equal(p, q) for p, q in zip(x[2:], y[2:]))
    for x, y in zip(res_a, res_b):
        assert x.final.keys() == y.final.keys()
        assert np.array_equal(list(x.final.values()), list(y.final.values()), equal_nan=True)
    assert [r.params for r in res_a] == [r.params for r in res_b]


def _spy_pids(monkeypatch):
    """The pid of every worker started, in order."""
    pids, init = [], row_worker.Rows.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        pids.append(self.pid)

    monkeypatch.setattr(row_worker.Rows, "__init__", spy)
    return pids


def _reaped(pid) -> bool:
    with pytest.raises(ChildProcessError):  # not our child any more: waited for
        os.waitpid(pid, os.WNOHANG)
    return True


@needs_fork
@pytest.mark.parametrize("model,extra", [("linear", {}), ("constant", {}), ("linear", {"train.batch_size": 50}),
                                         ("mlp", {"model.hidden": [4]})])
def test_rows_from_the_worker_equal_rows_from_the_loop(monkeypatch, capfd, model, extra):
    pids = _spy_pids(monkeypatch)
    cfgs = _cfgs(model, **extra)
    _assert_same(_train(cfgs, worker=True), _train(cfgs, worker=False))
    assert pids[0] is not None and pids[1] is None  # a worker ran the first, none the second
    assert _reaped(pids[0])
    assert capfd.readouterr().err == ""  # the worker answered every row: no fall-back


@needs_fork
def test_the_worker_computes_the_histograms_and_the_loop_none(monkeypatch, capfd):
    # The histograms of a row are computed where its sums are: on the worker, off the training core. Spied
    # in the training process only (patched after the fork, so the worker keeps the real function), the
    # loop computes none of them; and they equal the loop's own, bit for bit (histograms at steps 0, 30,
    # ..., 120: 5 rows x 2 tags, counts summing to n per run).
    in_loop, row_histograms, init = [0], log_row.row_histograms, row_worker.Rows.__init__

    def counted(*a):
        in_loop[0] += 1
        return row_histograms(*a)

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        monkeypatch.setattr(log_row, "row_histograms", counted)  # after the fork: this process only

    monkeypatch.setattr(row_worker.Rows, "__init__", spy)
    cfgs = _cfgs()
    on_worker = _train(cfgs, worker=True)
    assert in_loop[0] == 0 and capfd.readouterr().err == ""
    hists = on_worker[2]
    assert [(h[0], h[1]) for h in hists] == [(s, tag) for s in range(0, 121, 30) for tag in metrics.HIST_TAGS]
    assert all(np.array_equal(h[2].sum(1), np.full(len(cfgs), 300.0)) for h in hists)
    monkeypatch.setattr(row_worker.Rows, "__init__", init)
    _assert_same(on_worker, _train(cfgs, worker=False))
    assert in_loop[0] == 5  # the loop computes them itself without a worker


@needs_fork
def test_a_slow_worker_fills_the_ring_and_the_loop_waits(monkeypatch, capfd):
    # Every row takes the worker 20 ms (the loop's step well under 1 ms, a row every step): the ring of
    # slots fills and the loop waits for free slots, and no slot is written while the worker reads it.
    row_sums = log_row.row_sums

    def slow(*a):
        time.sleep(0.02)
        return row_sums(*a)

    cfgs = _cfgs(**{"train.log_every": 1, "train.steps": 40})
    monkeypatch.setattr(log_row, "row_sums", slow)  # the worker, forked after this, inherits it
    waited, wait = [0], row_worker.Rows._wait

    def counted(self):
        waited[0] += 1
        wait(self)

    monkeypatch.setattr(row_worker.Rows, "_wait", counted)
    slow_rows = _train(cfgs, worker=True)
    monkeypatch.setattr(log_row, "row_sums", row_sums)
    _assert_same(slow_rows, _train(cfgs, worker=False))
    assert waited[0] >= 30  # the loop waited for nearly every row
    assert capfd.readouterr().err == ""


@needs_fork
@pytest.mark.parametrize("sig,at,expected", [
    # killed with rows outstanding: the loop computes them from their slots
    (signal.SIGKILL, 10, "log-row worker stopped (it exited"),
    # frozen: after TIMEOUT_S without an answer the loop kills it, reaps it and computes the rest
    (signal.SIGSTOP, 5, "log-row worker stopped (it sent no answer for 0.5 s"),
    # Ctrl-C reaches the whole process group; the training process decides when to stop, not the worker
    (signal.SIGINT, 3, None),
])
def test_what_befalls_the_worker_loses_no_row(monkeypatch, capfd, sig, at, expected):
    if sig == signal.SIGSTOP:  # (elsewhere the usual 60 s: a slow spell of the machine is no silence)
        monkeypatch.setattr(row_worker, "TIMEOUT_S", 0.5)
    pids = _spy_pids(monkeypatch)
    cfgs = _cfgs()
    submit, count = row_worker.Rows.submit, [0]

    def signal_worker(self, raw, P, step, *histograms):  # before the `at`-th row is submitted
        count[0] += 1
        if count[0] == at and self.pid is not None:
            os.kill(self.pid, sig)
        submit(self, raw, P, step, *histograms)

    monkeypatch.setattr(row_worker.Rows, "submit", signal_worker)
    hit = _train(cfgs, worker=True)
    monkeypatch.setattr(row_worker.Rows, "submit", submit)
    _assert_same(hit, _train(cfgs, worker=False))
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [] if expected is None else (len(err) == 1 and expected in err[0])
    assert _reaped(pids[0])


@needs_fork
@pytest.mark.parametrize("where", ["sending", "just sent", "just read", "waiting", "in the loop"])
def test_ctrl_c_in_the_training_process_ends_the_runs_interrupted_with_their_rows(monkeypatch, capfd, where):
    # A real SIGINT to this process (KeyboardInterrupt, as Ctrl-C) at the 6th row: while requests are sent,
    # as their write returns, as answers are read (signals held: it lands once they are recorded; else
    # they would be lost and the loop would wait TIMEOUT_S for them, then fall back), while the loop
    # waits for an answer, or in a row computed in the loop.
    monkeypatch.setattr(row_worker, "TIMEOUT_S", 10.0)  # (a lost answer would cost this wait, then a fall-back)
    cfgs = _cfgs(**{"train.log_every": 1, "train.steps": 60})
    count = [0]

    def ctrl_c(original):
        def wrapped(*a, **kw):
            count[0] += 1
            if count[0] == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return original(*a, **kw)
        return wrapped

    if where == "sending":
        monkeypatch.setattr(row_worker.Rows, "_send", ctrl_c(row_worker.Rows._send))
    elif where == "just sent":  # the signal arrives as the write of requests returns
        write = os.write

        def written(fd, data):
            n = write(fd, data)
            if len(data) % 8 == 0 and data[:1] != b"l":  # the requests' pipe, not a line of text
                count[0] += 1
                if count[0] == 6:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.05)
            return n

        monkeypatch.setattr(os, "write", written)
    elif where == "just read":
        read = os.read

        def answers_read(fd, n):
            data = read(fd, n)
            if n == 4096:  # the answers' pipe (the only read of this size)
                count[0] += 1
                if count[0] == 6:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.05)  # time for any thread to take the signal before the answers are recorded
            return data

        monkeypatch.setattr(os, "read", answers_read)
    elif where == "waiting":
        monkeypatch.setattr(row_worker.select, "select", ctrl_c(row_worker.select.select))
    else:
        monkeypatch.setattr(log_row, "row_sums", ctrl_c(log_row.row_sums))
    pids = _spy_pids(monkeypatch)
    # A second thread, as PyTorch's intra-op pool has: the kernel may hand it the signal, and Python then
    # raises in the main thread at its next bytecode, wherever that is (a thread's signal mask does not
    # hold that back; the gate's Python handler does).
    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, daemon=True)
    bystander.start()
    try:
        res, blocks, _ = _train(cfgs, worker=where != "in the loop")
    finally:
        idle.set()
        bystander.join()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the gate gave it back
    assert {r.status for r in res} == {"interrupted"}
    steps = np.concatenate([b.steps for b in blocks])
    assert steps.tolist() == list(range(len(steps))) and 3 <= len(steps) < 61  # every row up to the stop, not after
    assert np.isfinite(np.concatenate([b.values for b in blocks])[:, :4]).all()  # with its sums
    if pids[0] is not None:
        assert _reaped(pids[0])
    assert capfd.readouterr().err == ""  # no answer lost, no fall-back


@needs_fork
def test_a_study_of_several_populations_leaves_no_process_and_no_descriptor(monkeypatch, tmp_path):
    from lab import study, sweeps

    monkeypatch.setenv("LAB_ROW_WORKER", "1")
    pids = _spy_pids(monkeypatch)
    fds = set(os.listdir("/proc/self/fd"))
    runs = sweeps.sweep_runs({"name": "two", "data.n": 100, "train.steps": 40, "train.figures": False},
                            {"loss.name": ["mse", "huber"], "data.n": [100, 120]})  # two populations (n differs)
    _, interrupted = study.execute(runs, tmp_path)
    assert not interrupted and {r.summary["status"] for r in runs} == {"completed"}
    assert len(pids) == 2 and None not in pids and all(_reaped(p) for p in pids)
    assert set(os.listdir("/proc/self/fd")) == fds


@needs_fork
def test_a_stopped_or_failed_training_reaps_its_worker(monkeypatch):
    pids = _spy_pids(monkeypatch)
    cfgs = _cfgs()
    res, blocks, _ = _train(cfgs, worker=True, should_stop=lambda: True)  # stops at the first flush
    assert {r.status for r in res} == {"interrupted"} and blocks[0].steps.tolist() == [0, 3, 6, 9, 12, 15, 18]
    assert _reaped(pids[-1])

    def fail(block):
        raise OSError("disk full")

    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    with pytest.raises(OSError, match="disk full"):
        trainer.train(cfgs, datasets, on_log=fail, flush_every=7, row_worker_process=True)
    assert _reaped(pids[-1])


def test_a_worker_runs_where_it_pays(monkeypatch):
    monkeypatch.delenv("LAB_ROW_WORKER", raising=False)
    monkeypatch.setattr(row_worker, "_cores", lambda: 2)
    big = row_worker.MIN_ELEMENTS
    linux = sys.platform == "linux"
    assert row_worker.worker_pays(torch.device("cpu"), big, rows=201) is linux
    assert not row_worker.worker_pays(torch.device("cpu"), big - 1, rows=201)  # a single run: op overhead
    assert not row_worker.worker_pays(torch.device("cpu"), big, rows=1)  # logging off: the last row only
    assert not row_worker.worker_pays(torch.device("cuda"), big, rows=201)  # asynchronous anyway
    monkeypatch.setattr(row_worker, "_cores", lambda: 1)
    assert not row_worker.worker_pays(torch.device("cpu"), big, rows=201)  # no core to spare
    monkeypatch.setenv("LAB_ROW_WORKER", "1")  # the user's choice, where a worker can run at all
    assert row_worker.worker_pays(torch.device("cpu"), 1, rows=201) is linux
    assert not row_worker.worker_pays(torch.device("cuda"), big, rows=201)
    monkeypatch.setenv("LAB_ROW_WORKER", "0")
    monkeypatch.setattr(row_worker, "_cores", lambda: 2)
    assert not row_worker.worker_pays(torch.device("cpu"), big, rows=201)


def test_rows_without_a_worker_refuse_more_rows_than_a_flush_holds_and_wait_to_be_cleared():
    cfgs = _cfgs()[:1]
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    pop, P, *_ = population.build(cfgs, datasets, torch.device("cpu"), torch.float32)
    rows = row_worker.Rows(pop, P, capacity=2, worker=False)
    m, flat, _, _ = pop.terms(keep=True)
    for step in range(2):
        rows.submit(log_row.raw_row(pop, m, None, P, flat, m, m), P, step)
    with pytest.raises(RuntimeError, match="more than 2 rows"):
        rows.submit(log_row.raw_row(pop, m, None, P, flat, m, m), P, 2)
    raws, steps = rows.collect()
    assert steps == [0, 1] and all(r.sums is not None for r in raws)
    assert rows.collect()[1] == [0, 1]  # until they are cleared (logged)
    rows.clear()
    assert rows.collect() == ([], []) and len(rows) == 0


@needs_fork
def test_closing_does_not_wait_forever_for_a_frozen_worker(monkeypatch):
    # A worker stopped (SIGSTOP) when the training ends: close() waits TIMEOUT_S for it to exit, then kills
    # and reaps it, instead of hanging the training process.
    monkeypatch.setattr(row_worker, "TIMEOUT_S", 0.3)
    cfgs = sorted(_cfgs(), key=lambda c: c.loss.name)  # in loss order, as lab.trainer lays runs out
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    pop, P, *_ = population.build(cfgs, datasets, torch.device("cpu"), torch.float32)
    rows = row_worker.Rows(pop, P, capacity=4, worker=True)
    m, flat, _, _ = pop.terms(keep=True)
    rows.submit(log_row.raw_row(pop, m, None, P, flat, m, m), P, 0)
    (raw,), _ = rows.collect()
    assert raw.sums is not None and rows.pid is not None
    pid = rows.pid
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    rows.close()
    assert 0.3 <= time.monotonic() - started < 10
    assert _reaped(pid) and rows.pid is None


@pytest.mark.parametrize("worker", [pytest.param(True, marks=needs_fork), False])
def test_a_flush_interrupted_after_its_histograms_logs_them_once(worker):
    # A Ctrl-C inside on_log (the histograms of the block already handed over) ends the training; the
    # final flush logs the block's scalar rows again (they were not cleared) but not its histograms.
    cfgs, hists, blocks = _cfgs(), [], []

    def on_log(block):
        blocks.append(block)
        if len(blocks) == 1:
            raise KeyboardInterrupt

    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    res = trainer.train(cfgs, datasets, on_log=on_log, on_hist=lambda *a: hists.append(a[:2]), flush_every=7,
                        row_worker_process=worker)
    assert {r.status for r in res} == {"interrupted"}
    assert np.array_equal(blocks[0].steps, blocks[1].steps)  # the block's rows again, 7 rows: steps 0..18
    assert hists == [(0, tag) for tag in metrics.HIST_TAGS]  # the one histogram step in it, once


@needs_fork
@pytest.mark.parametrize("model,writes_e", [("linear", False), ("constant", False), ("mlp", True)])
def test_a_line_model_s_step_leaves_e_to_the_worker(monkeypatch, capfd, model, writes_e):
    # With a worker, a line model's row step writes no residuals to the shared slots (they stay as mmap
    # made them: zeros); the worker recomputes them from the row's parameters (Population.row_residuals),
    # and the rows equal the loop's bit for bit. An MLP's step still writes them (its forward is no 2-op job).
    made, init = [], row_worker.Rows.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(row_worker.Rows, "__init__", spy)
    cfgs = _cfgs(model, **({"model.hidden": [4]} if model == "mlp" else {}))
    on_worker = _train(cfgs, worker=True)
    assert made[0].pid is None and capfd.readouterr().err == ""  # closed, after answering every row
    assert all(bool(slot.any()) == writes_e for slot in made[0].e)
    _assert_same(on_worker, _train(cfgs, worker=False))


@needs_fork
def test_a_ctrl_c_while_the_worker_is_reaped_leaves_no_gate_installed(monkeypatch):
    # The trainer holds signals with one gate, which the rows use too. A Ctrl-C as the worker was being
    # reaped (in Rows.close) skipped the gate's restore, which ran after it: the process kept the
    # gate's handler in front of its own. Expected: the KeyboardInterrupt propagates, the worker is
    # reaped, and Python's SIGINT handler is back.
    close, pids = row_worker.Rows.close, []

    def close_then_ctrl_c(rows):
        pids.append(rows.pid)
        close(rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(row_worker.Rows, "close", close_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _train(_cfgs(**{"train.log_every": 1, "train.steps": 20}), worker=True)
    assert pids[0] is not None and _reaped(pids[0])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
