"""lab.study: a run's figures never cost results, and every file of a run directory is written atomically.

Runs here are tiny (20 steps over 40 points on the CPU) so each test takes well under a second of training.
"""

import json

from lab import config, figures, rundir, study

TINY = {"device": "cpu", "data.n": 40, "data.n_val": 20, "train.steps": 20, "train.log_every": 10,
        "train.hist_every": 0}


def _runs(*losses):
    return [study.Run(config=config.from_flat({**TINY, "loss.name": loss}), name=f"clean-{loss}-s0") for loss in losses]


def test_a_figure_that_raises_costs_no_summary(tmp_path, monkeypatch, capsys):
    # Both runs train as one population; drawing the first run's figures raises. Before the guard the
    # exception left execute() and the second run never got its summary.json.
    def broken(cfg, ds, res):
        raise RuntimeError("no display")

    monkeypatch.setattr(figures, "run_figures", broken)
    runs, interrupted = study.execute(_runs("mse", "mae"), tmp_path, figures=True)
    assert not interrupted
    for r in runs:
        s = json.loads((r.dir / "summary.json").read_text())
        assert s["status"] == "completed" and r.summary["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("note: figures of") == 2 and "RuntimeError: no display" in err


def test_every_file_of_a_run_directory_is_written_atomically(tmp_path, monkeypatch):
    # Spy on rundir.write_atomic: the figures and the result files go through it (data.npz has its own
    # atomic write in lab.data, tested in test_data.py).
    written = []
    real = rundir.write_atomic

    def spy(path, payload):
        written.append(path.relative_to(tmp_path).as_posix())
        real(path, payload)

    monkeypatch.setattr(rundir, "write_atomic", spy)
    (run,), _ = study.execute(_runs("huber"), tmp_path, figures=True)
    assert set(written) == {"clean-huber-s0/config.toml", "clean-huber-s0/figures/fit.png",
                            "clean-huber-s0/figures/residuals.png", "clean-huber-s0/summary.json"}
    assert (run.dir / "figures" / "fit.png").read_bytes()[:4] == b"\x89PNG"
    assert (run.dir / "data.npz").is_file()
    assert not [p for p in run.dir.rglob(".*.tmp")]  # no temporary left behind
