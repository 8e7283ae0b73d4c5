"""`lab report`: rows, aggregates and broken runs, from hand-written summaries with known numbers."""

import argparse
import csv
import io
import json
import math
import statistics
from fractions import Fraction
from pathlib import Path

import pytest

from lab import config, report


def make_run(root, name, loss, seed, loss_train, slope, steps_to_converge=10, status="completed", **extra_config):
    """A run directory as lab.study writes it, with chosen numbers (only the fields report reads)."""
    d = root / name
    d.mkdir(parents=True)
    flat = config.to_flat(config.from_flat({"loss.name": loss, "seed": seed, **extra_config}))
    summary = {"status": status, "name": name, "swept": {"loss.name": loss, "seed": seed}, "config": flat,
               "final": {"loss/train": loss_train, "convergence/gap": 0.0, "loss/val_mse": 0.5,
                         "oscillation/flip_rate": 0.25, "grad/outlier_share": 0.1},
               "params": {"slope": slope, "intercept": 1.0}, "steps_to_converge": steps_to_converge}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.toml").write_text("")
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sw"
    # mse: losses 1, 2, 3 over seeds (mean 2, sample std 1); mae: 4, 6 (mean 5, std sqrt(2)).
    make_run(root, "clean-mse-s0", "mse", 0, 1.0, 2.0, 10)
    make_run(root, "clean-mse-s1", "mse", 1, 2.0, 2.5, 20)
    make_run(root, "clean-mse-s2", "mse", 2, 3.0, 3.0, 30)
    make_run(root, "clean-mae-s0", "mae", 0, 4.0, 1.0, None)
    make_run(root, "clean-mae-s1", "mae", 1, 6.0, 3.0, 40)
    return root


def args(d, **kw):
    return argparse.Namespace(dir=str(d), by=kw.get("by"), csv=kw.get("csv"), markdown=kw.get("markdown"))


def test_one_row_per_run_with_swept_keys_metrics_and_params(sweep):
    t = report.table(report.load_runs(sweep))
    assert t.header[:4] == ["run", "loss.name", "seed", "status"]
    assert [r[0] for r in t.rows] == ["clean-mae-s0", "clean-mae-s1", "clean-mse-s0", "clean-mse-s1", "clean-mse-s2"]
    row = dict(zip(t.header, t.rows[3]))
    assert row["loss.name"] == "mse" and row["seed"] == 1 and row["status"] == "completed"
    assert row["loss"] == 2.0 and row["slope"] == 2.5 and row["conv_step"] == 20
    assert dict(zip(t.header, t.rows[0]))["conv_step"] is None  # never converged


def test_by_aggregates_mean_and_sample_std_over_the_other_keys(sweep):
    t = report.aggregate(report.load_runs(sweep), ["loss.name"])
    rows = {r[0]: dict(zip(t.header, r)) for r in t.rows}
    assert rows["mse"]["runs"] == 3 and rows["mse"]["status"] == "3 completed"
    assert rows["mse"]["loss"].mean == pytest.approx(2.0) and rows["mse"]["loss"].std == pytest.approx(1.0)
    assert rows["mae"]["loss"].mean == pytest.approx(5.0) and rows["mae"]["loss"].std == pytest.approx(2**0.5)
    assert rows["mse"]["slope"].mean == pytest.approx(2.5) and rows["mse"]["slope"].std == pytest.approx(0.5)
    # steps to converge average over the runs that converged; the count says how many did.
    assert rows["mae"]["conv_step"].mean == 40 and rows["mae"]["conv_step"].n == 1
    assert rows["mae"]["converged"] == "1/2" and rows["mse"]["converged"] == "3/3"
    assert str(rows["mse"]["loss"]) == "2 ± 1"


def test_text_csv_and_markdown_outputs(sweep, tmp_path, capsys):
    assert report.main(args(sweep, by="loss.name", csv=tmp_path / "t.csv", markdown=tmp_path / "t.md")) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[:3] == ["loss.name", "runs", "status"]
    assert text[2].split()[:5] == ["mae", "2", "2", "completed", "5"]  # "5 ± 1.4"
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    mse = next(r for r in rows if r["loss.name"] == "mse")
    assert float(mse["loss_mean"]) == 2.0 and float(mse["loss_std"]) == 1.0
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0].startswith("| loss.name | runs | status |") and len(md) == 4


def test_a_broken_run_is_listed_not_skipped(sweep, capsys):
    (sweep / "clean-mse-s3").mkdir()
    (sweep / "clean-mse-s3" / "config.toml").write_text('seed = 3\n[loss]\nname = "mse"\n')  # killed mid-run
    (sweep / "half").mkdir()
    (sweep / "half" / "summary.json").write_text('{"status": "compl')  # half-written
    assert report.main(args(sweep)) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "broken" in lines["clean-mse-s3"] and "summary.json missing" in lines["clean-mse-s3"]
    assert "broken" in lines["half"] and "unreadable" in lines["half"]
    # The broken run's config.toml still gives its keys, so it lands in its group.
    t = report.aggregate(report.load_runs(sweep), ["loss.name"])
    mse = next(dict(zip(t.header, r)) for r in t.rows if r[0] == "mse")
    assert mse["status"] == "3 completed, 1 broken" and mse["loss"].n == 3


def test_a_summary_of_the_wrong_shape_is_listed_as_broken(sweep, capsys):
    # Well-formed JSON, wrong types: `final` and `swept` are lists, not tables. Listed, never a traceback.
    (sweep / "odd").mkdir()
    (sweep / "odd" / "summary.json").write_text('{"status": "completed", "final": [1], "swept": [1]}')
    assert report.main(args(sweep)) == 0
    assert report.main(args(sweep, by="loss.name")) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "broken" in lines["odd"] and "'final' is not a table" in lines["odd"]


def test_by_groups_on_exact_values_and_shows_them_exactly(tmp_path, capsys):
    # 0.001 and 0.0010001 agree to 4 significant digits: two groups all the same, shown apart.
    make_run(tmp_path, "a", "mse", 0, 1.0, 2.0, **{"optim.lr": 0.001})
    make_run(tmp_path, "b", "mse", 1, 3.0, 2.0, **{"optim.lr": 0.001})
    make_run(tmp_path, "c", "mse", 0, 5.0, 2.0, **{"optim.lr": 0.0010001})
    runs = report.load_runs(tmp_path)
    assert "optim.lr" in report.key_columns(runs)  # it differs, though not in its first 4 digits
    t = report.aggregate(runs, ["optim.lr"])
    assert [(r[0], r[1]) for r in t.rows] == [(0.001, 2), (0.0010001, 1)]
    assert t.rows[0][t.header.index("loss")].mean == 2.0 and t.rows[1][t.header.index("loss")].mean == 5.0
    assert report.main(args(tmp_path, by="optim.lr")) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[2:]] == ["0.001", "0.0010001"]


def test_by_averages_completed_runs_only_and_says_how_many(tmp_path, capsys):
    # Seed 0 completed (loss 0.28, slope 2); seed 1 diverged, its summary holding the last finite numbers
    # (loss 1e6, slope 50); seed 2 failed with nothing. Only the completed run makes the means: 0.28 over
    # 1 of 3 runs, and the cell says so.
    make_run(tmp_path, "s0", "mse", 0, 0.28, 2.0, 10)
    make_run(tmp_path, "s1", "mse", 1, 1e6, 50.0, None, status="diverged")
    make_run(tmp_path, "s2", "mse", 2, None, None, None, status="failed")
    t = report.aggregate(report.load_runs(tmp_path), ["loss.name"])
    (row,) = [dict(zip(t.header, r)) for r in t.rows]
    assert row["status"] == "1 completed, 1 diverged, 1 failed" and row["runs"] == 3
    assert (row["loss"].mean, row["loss"].n, row["loss"].of) == (0.28, 1, 3)
    assert row["slope"].mean == 2.0 and str(row["slope"]) == "2 (n=1/3)"
    assert str(row["conv_step"]) == "10" and row["converged"] == "1/3"  # conv_step: `converged` counts
    assert report.main(args(tmp_path, by="loss.name", csv=tmp_path / "t.csv")) == 0
    assert "0.28 (n=1/3)" in capsys.readouterr().out
    (saved,) = csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text()))
    assert saved["loss_mean"] == "0.28" and saved["loss_n"] == "1"


def test_csv_writes_a_step_count_as_an_integer(sweep, tmp_path):
    # summary.json holds steps_to_converge as an integer; the CSV wrote it as 20.0.
    assert report.main(args(sweep, csv=tmp_path / "t.csv")) == 0
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text()))}
    assert rows["clean-mse-s1"]["conv_step"] == "20" and rows["clean-mae-s0"]["conv_step"] == ""  # never converged
    assert rows["clean-mse-s1"]["loss"] == "2.0" and rows["clean-mse-s1"]["slope"] == "2.5"  # floats stay floats


def test_a_full_group_shows_no_count(sweep):
    t = report.aggregate(report.load_runs(sweep), ["loss.name"])
    assert str(dict(zip(t.header, t.rows[1]))["loss"]) == "2 ± 1"  # mse: 3 of 3 runs


def test_keys_that_differ_are_columns_even_when_not_swept(tmp_path):
    make_run(tmp_path, "a", "huber", 0, 1.0, 2.0, **{"loss.delta": 0.5})
    make_run(tmp_path, "b", "huber", 0, 1.0, 2.0, **{"loss.delta": 2.0})
    t = report.table(report.load_runs(tmp_path))
    assert "loss.delta" in t.header and "optim.lr" not in t.header


def test_bad_report_requests(sweep, tmp_path):
    with pytest.raises(ValueError, match="unknown key 'loss.nme'; did you mean 'loss.name'"):
        report.main(args(sweep, by="loss.nme"))
    with pytest.raises(ValueError, match="no runs below"):
        report.main(args(_empty(tmp_path)))
    with pytest.raises(ValueError, match="is not a directory"):
        report.main(args(tmp_path / "missing"))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_numbers_past_the_float_range_are_shown_not_raised(tmp_path, capsys):
    # Hand-edited summaries: an integer no float holds (10^400) and losses near the float64 limit, whose
    # sum overflows. The integer is not a number for the report; the mean and std are the exact ones:
    # mean(1.5e308, 1.7e308) = 1.6e308 (float(Fraction sum / 2)), std = |1.7e308 - 1.5e308| / sqrt(2).
    root = tmp_path / "sw"
    make_run(root, "clean-mse-s0", "mse", 0, 1.5e308, 2.0, 10**400)
    make_run(root, "clean-mse-s1", "mse", 1, 1.7e308, 2.0, 10)
    assert report.main(args(root)) == 0
    assert report.main(args(root, by="loss.name")) == 0
    t = report.aggregate(report.load_runs(root), ["loss.name"])
    loss = dict(zip(t.header, t.rows[0]))["loss"]
    assert loss.mean == float((Fraction(1.5e308) + Fraction(1.7e308)) / 2)
    assert loss.std == pytest.approx((1.7e308 - 1.5e308) / math.sqrt(2), rel=1e-15)
    assert report.MeanStd.of([1.0, 2.0, 4.0]).std == statistics.stdev([1.0, 2.0, 4.0])  # unscaled: as before


def test_a_hand_written_config_with_a_toml_date_is_reported(sweep, capsys):
    # TOML has dates; JSON, which groups the report's keys, has none. A broken run's config.toml with one
    # is listed like any other broken run.
    (sweep / "dated").mkdir()
    (sweep / "dated" / "config.toml").write_text("seed = 1979-05-27\n")
    assert report.main(args(sweep)) == 0
    assert report.main(args(sweep, by="seed")) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "broken" in lines["dated"]


def test_a_report_of_the_current_folder_names_its_run(sweep, monkeypatch):
    # `lab report .` inside a run directory showed an empty run name (Path(".").name is "").
    monkeypatch.chdir(sweep / "clean-mse-s1")
    (run,) = report.load_runs(Path("."))
    assert run["run"] == "clean-mse-s1" and run["summary"]["final"]["loss/train"] == 2.0
