"""`lab claims`: the quick study end to end, verdicts recomputed from their numbers, every measurement on
small cases with known answers, the study-file format and its errors.

Covers lab/claims.py, lab/claim_studies.py, lab/claim_measures.py, lab/claim_training.py,
lab/claim_comparison.py and lab/claim_report.py.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import (
    claim_comparison,
    claim_studies,
    claim_training,
    claims,
    cli,
    config,
    data,
    study,
    sweeps,
    trainer,
)
from lab import claim_measures as cm
from lab.claim_studies import Check, judge, verdict
from lab.config import ConfigError
from lab.events import EventWriter

EXPERIMENTS = Path(claims.EXPERIMENTS)


# ---------------------------------------------------------------------------------------------------
# The quick study, once (about 15 s on 2 cores)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims") / "out"
    return claims.run(quick=True, out=out, log=lambda msg: None)


def test_every_study_has_a_verdict_recomputed_from_its_numbers(quick):
    ids = {claim_studies.load_study(p).id for p in EXPERIMENTS.glob("*.toml")}
    assert {r.study.id for r in quick.results} == ids
    for r in quick.results:
        assert r.error is None, r.error
        assert r.verdict in claims.VERDICTS
        outcomes = []
        for c in r.checks:
            # The values judged are exactly the measurement's numbers, and judging them again agrees.
            assert c.values == [float(v) for v in r.values[c.check.metric]]
            assert judge(c.check, c.values, r.study.agree)[0] == c.outcome
            outcomes.append(c.outcome)
        assert r.verdict == verdict(outcomes)


def test_claims_the_guide_gets_right_hold_and_the_linear_scale_claim_does_not(quick):
    # Expected from the measurements on these seeds (see the numbers in the report): every claim holds except
    # 7a, where a linear model's MSE curvature does not depend on the target scale, so nothing diverges.
    by_id = {r.study.id: r for r in quick.results}
    assert {i: r.verdict for i, r in by_id.items() if r.verdict != "holds"} == {"7a": "does not hold"}
    failing = [c for c in by_id["7a"].checks if c.outcome == "fail"]
    assert [c.check.metric for c in failing] == ["raw_diverged"]
    assert failing[0].values == [0.0, 0.0]  # both seeds: the x1000 linear run completed


def test_run_statuses_are_what_the_claims_measured(quick):
    # Only the MLP trained on x1000 targets without normalisation or clipping diverges (2 quick seeds).
    for r in quick.results:
        expected = {"completed": 6, "diverged": 2} if r.study.id == "7b" else {"completed": len(r.runs)}
        assert r.statuses == (expected if r.runs else {}), r.study.id
        for run in r.runs:
            assert (run.dir / "summary.json").is_file() and list(run.dir.glob("events.out.tfevents.*"))


def test_flipping_a_threshold_flips_the_verdict(quick, tmp_path):
    # Same runs, the oscillation study's amplitude check demanding the impossible: the verdict follows it.
    src = (EXPERIMENTS / "mae_oscillation.toml").read_text()
    flipped = src.replace('metric = "decay_ratio"\nmin = 10.0', 'metric = "decay_ratio"\nmin = 1e9')
    assert flipped != src
    (tmp_path / "mae_oscillation.toml").write_text(flipped)
    st = claim_studies.load_study(tmp_path / "mae_oscillation.toml", quick=True)
    original = next(r for r in quick.results if r.study.id == "5")
    again = claims.evaluate(st, original.runs)
    assert original.verdict == "holds" and again.verdict == "does not hold"
    assert again.values == original.values


def test_report_table_json_and_figures_are_written(quick):
    out = quick.out
    report = (out / "report.md").read_text()
    assert "| claim | measured | numbers | verdict |" in report and f"tensorboard --logdir {out}" in report
    assert (out / "table.md").read_text().count("\n") == len(quick.results) + 2
    saved = json.loads((out / "claims.json").read_text())
    assert [c["verdict"] for c in saved["claims"]] == [r.verdict for r in quick.results]
    assert saved["runs"] == sum(len(r.runs) for r in quick.results) and saved["populations"] == 5
    names = {n for r in quick.results for n in r.plots}
    assert set(quick.figures) == names and len(names) >= 7
    for path in quick.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{path.name}" in report
    images = _image_tags(out / "figures")
    assert images == {f"claims/{n}" for n in names}


def _image_tags(folder: Path) -> set[str]:
    from tensorboard.compat.proto import event_pb2

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        raw, pos = path.read_bytes(), 0
        while pos + 12 <= len(raw):
            (length,) = np.frombuffer(raw[pos:pos + 8], "<u8")
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + int(length)])
            pos += 12 + int(length) + 4
            tags |= {v.tag for v in event.summary.value if v.HasField("image")}
    return tags


def test_terminal_table_lists_every_claim_with_its_verdict(quick):
    text = claims.table_text(quick.results)
    for r in quick.results:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{r.study.id}. "))
        assert line.rstrip().endswith(r.verdict)


# ---------------------------------------------------------------------------------------------------
# The command line (loss-only studies: no training, so fast)


@pytest.fixture
def loss_only(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    folder.mkdir()
    for name in ("penalty_scaling", "gradient_flow", "log_cosh_limits"):
        shutil.copy(EXPERIMENTS / f"{name}.toml", folder)
    monkeypatch.setattr(claims, "EXPERIMENTS", folder)
    return folder


def test_cli_runs_the_studies_prints_the_table_and_reruns_into_the_same_folder(loss_only, tmp_path, capsys):
    out = tmp_path / "out"
    for _ in range(2):  # the second run clears what the first wrote
        assert cli.main(["claims", "--quick", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "1. Penalty scaling" in printed and f"tensorboard --logdir {out}" in printed
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["gradient_flow.png", "log_cosh.png",
                                                                         "target_practice.png"]


def test_cli_only_measures_the_claims_it_names(loss_only, tmp_path, capsys):
    # (claims.run took `only`; the command line had no way to pass it)
    out = tmp_path / "out"
    assert cli.main(["claims", "--quick", "--out", str(out), "--only", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1. Penalty scaling" in printed and "log-cosh" not in printed.lower()
    assert cli.main(["claims", "--out", str(out), "--only", "1,99"]) == 2
    assert "no study with claim id '99'" in capsys.readouterr().err


def test_cli_refuses_a_folder_it_did_not_write(loss_only, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["claims", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not written by `lab claims`" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_reports_a_bad_study_file_in_one_line(loss_only, capsys):
    (loss_only / "bad.toml").write_text('[claim]\nid = "x"\ntitle = "t"\nguide = "g"\nmeasured = "m"\n'
                                        'measure = "penalty_tabel"\n')
    assert cli.main(["claims", "--out", str(loss_only.parent / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.toml: unknown measure 'penalty_tabel'" in err
    assert "did you mean 'penalty_table'" in err


def test_claims_output_is_written_atomically(loss_only, tmp_path, monkeypatch):
    from lab import rundir

    written = []
    real = rundir.write_atomic

    def spy(path, payload):
        written.append(Path(path).relative_to(tmp_path / "o").as_posix())
        real(path, payload)

    monkeypatch.setattr(rundir, "write_atomic", spy)
    claims.run(out=tmp_path / "o", experiments=loss_only, log=lambda m: None)
    assert set(written) == {claims.MARKER, "figures/target_practice.png", "figures/gradient_flow.png",
                            "figures/log_cosh.png", "report.md", "table.md", "claims.json"}


def _ctrl_c():
    """What a Ctrl-C does: SIGINT to this process (its handler, not the caller, decides what follows)."""
    os.kill(os.getpid(), signal.SIGINT)


def _ctrl_c_while_writing(monkeypatch, name: str) -> None:
    """A Ctrl-C each time a file called `name` is about to be written (then it is written)."""
    from lab import rundir

    real = rundir.write_atomic

    def ctrl_c_then_write(path, payload):
        if Path(path).name == name:
            _ctrl_c()
        real(path, payload)

    monkeypatch.setattr(rundir, "write_atomic", ctrl_c_then_write)


def test_ctrl_c_while_measuring_still_writes_the_report(loss_only, tmp_path, monkeypatch, capsys):
    # A Ctrl-C after training used to leave no report.md, table.md or claims.json, and a bare "interrupted".
    # Here it lands in claim 4's measurement, and a second one while report.md is written is ignored.
    def interrupted(runs, params):
        _ctrl_c()
        raise AssertionError("the Ctrl-C did not stop the measurement")

    monkeypatch.setitem(cm.MEASURES, "gradient_flow", dataclasses.replace(cm.MEASURES["gradient_flow"], fn=interrupted))
    _ctrl_c_while_writing(monkeypatch, "report.md")
    out = tmp_path / "out"
    assert cli.main(["claims", "--out", str(out)]) == 130
    printed = capsys.readouterr()
    assert "1. Penalty scaling" in printed.out and "not measured: interrupted" in printed.out
    assert printed.err == (f"interrupted while measuring: 1 of 3 claims measured, 0 figures drawn; "
                           f"report: {out / 'report.md'}\n")
    saved = json.loads((out / "claims.json").read_text())
    assert (saved["interrupted"], saved["interrupted_while"]) == (True, "measuring")
    assert [(c["id"], c["verdict"], c["error"]) for c in saved["claims"]] == [
        ("1", "holds", None), ("4", "inconclusive", "not measured: interrupted"),
        ("10", "inconclusive", "not measured: interrupted")]
    report = (out / "report.md").read_text()
    assert "**Interrupted** while measuring: claims 4, 10 not measured (inconclusive); no figures drawn." in report
    assert (out / "table.md").read_text().count("\n") == 3 + 2 and not (out / "figures").exists()


def test_ctrl_c_while_the_report_is_written_is_not_lost(loss_only, tmp_path, monkeypatch, capsys):
    # Every claim measured and drawn; the only Ctrl-C lands while report.md is written. The files are
    # finished (they say what was measured), and the exit code and one line say the Ctrl-C came: it used
    # to be swallowed (exit 0).
    _ctrl_c_while_writing(monkeypatch, "report.md")
    out = tmp_path / "out"
    assert cli.main(["claims", "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"interrupted after the report was written; report: {out / 'report.md'}\n"
    saved = json.loads((out / "claims.json").read_text())
    assert [c["verdict"] for c in saved["claims"]] == ["holds"] * 3 and len(saved["figures"]) == 3


def test_ctrl_c_while_drawing_keeps_the_figures_already_drawn(loss_only, tmp_path, monkeypatch, capsys):
    from lab import figures

    real, drawn = figures.claim_figure, []

    def draw_one_then_ctrl_c(payload):
        if drawn:
            _ctrl_c()
        drawn.append(payload["kind"])
        return real(payload)

    monkeypatch.setattr(figures, "claim_figure", draw_one_then_ctrl_c)
    out = tmp_path / "out"
    assert cli.main(["claims", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted while drawing figures: 3 of 3 claims measured, "
                                                     "1 figures drawn")
    saved = json.loads((out / "claims.json").read_text())
    assert [c["verdict"] for c in saved["claims"]] == ["holds"] * 3 and saved["interrupted_while"] == "drawing figures"
    assert list(saved["figures"]) == ["target_practice"]  # claim 1's, drawn before the Ctrl-C
    report = (out / "report.md").read_text()
    assert "every claim measured; 1 of 3 figures drawn" in report and "![target_practice]" in report
    assert "![gradient_flow]" not in report
    assert _image_tags(out / "figures") == {"claims/target_practice"}  # the event file was closed, not lost


def test_claims_json_writes_whole_numbers_as_integers(loss_only, tmp_path):
    # Steps to converge are whole numbers kept as floats (NaN when a run failed): claims.json wrote 43.0.
    claims.run(out=tmp_path / "o", experiments=loss_only, only=["1"], log=lambda m: None)
    text = (tmp_path / "o" / "claims.json").read_text()
    values = json.loads(text)["claims"][0]["values"]
    assert values["mse_at"] == [16] and type(values["mse_at"][0]) is int  # MSE penalty of a 4-ring miss
    assert re.findall(r"\d\.0\b", text) == []  # no number of the file is written as a whole float
    from lab.claim_report import _json_numbers

    assert _json_numbers({"steps_mse": [43.0, 48.0], "ratio": [2.09, math.nan], "big": 1e300, "inf": -math.inf}) == \
        {"steps_mse": [43, 48], "ratio": [2.09, "nan"], "big": 1e300, "inf": "-inf"}


def _hand_made_runs(statuses):
    runs = [sweeps.Run(config=None, name=f"r{i}") for i in range(len(statuses))]
    for r, s in zip(runs, statuses):
        r.summary = {"status": s}
    return runs


@pytest.mark.parametrize("statuses,line", [
    (["completed"] * 3, "trained   6 Convergence"),
    (["completed", "failed", "diverged", "failed"], "trained   6 Convergence (2 failed, 1 diverged; "),
    (["completed", "failed", "interrupted", "interrupted"], "interrupted   6 Convergence (2 of 4 runs finished; "),
])
def test_progress_line_says_how_a_study_s_runs_ended(statuses, line):
    # It said "trained" whatever happened to the runs.
    st = claim_studies.Study(Path("c.toml"), "6", "Convergence", "g", "m", "convergence_speed", {}, [])
    runs, logged = _hand_made_runs(statuses), []
    progress = claims._Progress([st], {"6": runs}, logged.append)
    for r in runs:
        progress.done(r)
    (got,) = logged
    assert got.startswith("  " + line) and re.search(r"\d\.\d s\)$", got), got


def test_threshold_flip_on_a_loss_only_claim(loss_only, tmp_path):
    path = loss_only / "penalty_scaling.toml"
    path.write_text(path.read_text().replace("min = 15.999999\nmax = 16.000001", "min = 3.999999\nmax = 4.000001"))
    report = claims.run(out=tmp_path / "o", experiments=loss_only, only=["1"], log=lambda m: None)
    (r,) = report.results
    assert r.verdict == "does not hold"  # MSE's penalty of a 4-ring miss is 16, not 4
    assert [c.outcome for c in r.checks] == ["fail", "pass", "pass", "pass"]


# ---------------------------------------------------------------------------------------------------
# Verdict rules


@pytest.mark.parametrize("values,outcome,passed,failed", [
    ([5.0, 6.0, 7.0, 8.0], "pass", 4, 0),
    ([5.0, 6.0, 7.0, 1.0], "pass", 3, 1),          # 3/4 >= agree 0.75
    ([5.0, 6.0, 1.0, 1.0], "inconclusive", 2, 2),  # seeds disagree
    ([1.0, 1.0, 1.0, 6.0], "fail", 1, 3),
    ([5.0, 6.0, math.nan, 1.0], "inconclusive", 2, 1),  # a run that could not be measured counts for neither
    ([math.inf], "pass", 1, 0),
    ([], "inconclusive", 0, 0),
])
def test_judge_per_seed(values, outcome, passed, failed):
    assert judge(Check("m", min=3.0), values, agree=0.75) == (outcome, passed, failed, None)


def test_judge_geomean_uses_the_interval_of_the_log_ratios():
    # logs 0 and log 4 -> mean log 2, sd(ddof=1) = log(4)/sqrt(2), half-width 2 * sd / sqrt(2) = log 4:
    # interval exp(log 2 -+ log 4) = [0.5, 8].
    outcome, _, _, (lo, hi) = judge(Check("m", min=1.0, stat="geomean"), [1.0, 4.0], 0.75)
    assert (lo, hi) == pytest.approx((0.5, 8.0)) and outcome == "inconclusive"
    assert judge(Check("m", min=0.4, stat="geomean"), [1.0, 4.0], 0.75)[0] == "pass"
    assert judge(Check("m", min=9.0, stat="geomean"), [1.0, 4.0], 0.75)[0] == "fail"
    assert judge(Check("m", max=1.0, stat="mean"), [0.0, 0.2, 0.4], 0.75)[0] == "pass"  # mean 0.2 ± 0.23
    assert judge(Check("m", min=1.0, stat="geomean"), [2.0, -1.0, 3.0], 0.75)[0] == "inconclusive"


def test_verdict_of_a_claim():
    assert verdict(["pass", "pass"]) == "holds"
    assert verdict(["pass", "inconclusive"]) == "inconclusive"
    assert verdict(["inconclusive", "fail"]) == "does not hold"
    assert verdict([]) == "inconclusive"


def test_check_condition_text():
    assert Check("m", min=15.999999, max=16.000001).condition() == "16 ± 1e-06"
    assert Check("m", min=0.999, max=1.001).condition() == "1 ± 0.001"
    assert Check("m", min=0.2, max=0.6).condition() == "in [0.2, 0.6]"
    assert Check("m", max=0.01).condition() == "≤ 0.01"


def test_number_format():
    # lab.rundir.fmt at 3 digits: whole numbers stay whole, so 123456.0 is "123456" and 123456.7 scientific.
    assert [cm.fmt(x) for x in (3100.4, 12.345, 0.5, 16.0, 0.00012, 123456.0, 123456.7, math.nan, math.inf)] == \
        ["3100", "12.3", "0.5", "16", "1.20e-04", "123456", "1.23e+05", "n/a", "inf"]


def test_spread_counts_non_finite_values():
    assert claims.spread([1.0, 3.0]) == "2 ± 1"
    assert claims.spread([4.0]) == "4"
    assert claims.spread([math.inf, math.inf]) == "inf"
    assert claims.spread([1.0, math.nan]) == "1 ± 0 (1 of 2 not finite)"


# ---------------------------------------------------------------------------------------------------
# Study files


def _study(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return claim_studies.load_study(path)


CLAIM = '[claim]\nid = "9"\ntitle = "t"\nguide = "g"\nmeasured = "m"\nmeasure = "outlier_shift"\n'
CHECK = '[[claim.check]]\nmetric = "mse_over_mae"\nmin = 3.0\n'


@pytest.mark.parametrize("text,message", [
    ("data.n = 20\n", "no [claim] table"),
    (CLAIM.replace('title = "t"\n', ""), "[claim] needs title"),
    (CLAIM, "no [[claim.check]]"),
    (CLAIM + 'agree = 0.5\n' + CHECK, "agree must be a number in (0.5, 1]"),
    (CLAIM + 'seeds = 3\n' + CHECK, "unknown [claim] key 'seeds'"),
    (CLAIM + '[[claim.check]]\nmetric = "mse_over_mea"\nmin = 3.0\n', "did you mean 'mse_over_mae'"),
    (CLAIM + '[[claim.check]]\nmetric = "mse_over_mae"\n', "needs min or max"),
    (CLAIM + '[[claim.check]]\nmetric = "mse_over_mae"\nmin = 3.0\nmax = 1.0\n', "min 3 > max 1"),
    # an infinite bound is no bound (min = -inf, max = -inf could never hold): leave it out
    (CLAIM + '[[claim.check]]\nmetric = "mse_over_mae"\nmax = inf\n', "max must be a finite number"),
    (CLAIM + '[[claim.check]]\nmetric = "mse_over_mae"\nmin = 3.0\nstat = "median"\n', "stat must be one of"),
    (CLAIM + '[[claim.check]]\nmetric = ["x"]\nmin = 3.0\n', "check metric ['x'] is not measured"),
    (CLAIM + '[[claim.check]]\nmetric = {a = 1}\nmin = 3.0\n', "check metric {'a': 1} is not measured"),
    (CLAIM + '[claim.params]\nflor = 1.0\n' + CHECK, "no parameter 'flor' (it takes: floor); did you mean 'floor'?"),
    ('loss.nme = "mae"\n' + CLAIM + CHECK, "s.toml: unknown key 'loss.nme'"),
    ('[sweep]\nseed = 3\n' + CLAIM + CHECK, "[sweep] seed must be a non-empty list"),
    ('[sweep]\n"loss.delta,optim.lr" = [0.1, 0.2]\n' + CLAIM + CHECK, "each value must be a list of 2"),
    # A parameter of the wrong kind failed only after every run had trained (formatting its label)
    (CLAIM + '[claim.params]\nfloor = "1e-6"\n' + CHECK, "[claim.params] floor must be a number like its default"),
    # One key varied twice in a block: the last silently won
    ('[sweep]\n"loss.name,loss.name" = [["mse", "mae"]]\n' + CLAIM + CHECK, "loss.name is varied twice in one block"),
    ('[sweep]\n"loss.name,seed" = [["mse", 0]]\nseed = [5, 6]\n' + CLAIM + CHECK, "seed is varied twice"),
    ('data.n = 20\n' + CLAIM.replace("outlier_shift", "penalty_table") + '[[claim.check]]\nmetric = "mse_at"\nmin = 1\n',
     "trains nothing"),
])
def test_bad_study_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        _study(tmp_path, text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sweep_blocks_are_joined_zipped_keys_vary_together_and_quick_overrides(tmp_path):
    text = ('train.steps = 300\n[[sweep]]\n"loss.name" = ["mse", "mae"]\nseed = [0, 1, 2]\n'
            '[[sweep]]\n"loss.name" = ["huber"]\n"loss.delta,optim.lr" = [[0.1, 0.5], [2.0, 0.05]]\nseed = [0, 1, 2]\n'
            '[[sweep]]\n"loss.name" = ["mse"]\nseed = [0]\n'  # already in the first block: trained once
            + CLAIM + CHECK + '[claim.quick]\nseed = [0]\n"train.steps" = 50\n')
    full = _study(tmp_path, text)
    assert len(full.grid) == 6 + 6
    pairs = {(c.loss.delta, c.optim.lr) for c, _ in full.grid if c.loss.name == "huber"}
    assert pairs == {(0.1, 0.5), (2.0, 0.05)}
    quick = claim_studies.load_study(tmp_path / "s.toml", quick=True)
    assert len(quick.grid) == 2 + 2 and {c.train.steps for c, _ in quick.grid} == {50}
    assert {c.seed for c, _ in quick.grid} == {0}


def test_every_shipped_study_loads_in_both_modes():
    for path in EXPERIMENTS.glob("*.toml"):
        full, quick = claim_studies.load_study(path), claim_studies.load_study(path, quick=True)
        assert len(quick.grid) <= len(full.grid)
        assert "#" in path.read_text().splitlines()[0]  # each file opens with the question it answers


# ---------------------------------------------------------------------------------------------------
# Measurements on the loss functions (known values)


def test_penalties_and_gradients_of_the_loss_modules():
    e = [-4.0, -1.0, 0.5, 3.0]
    assert cm.penalties("mse", e).tolist() == [16.0, 1.0, 0.25, 9.0]
    assert cm.penalties("mae", e).tolist() == [4.0, 1.0, 0.5, 3.0]
    assert cm.gradients("mse", e).tolist() == [-8.0, -2.0, 1.0, 6.0]  # 2e
    assert cm.gradients("mae", e).tolist() == [-1.0, -1.0, 1.0, 1.0]  # sign(e)
    assert cm.gradients("huber", e, delta=1.5).tolist() == [-1.5, -1.0, 0.5, 1.5]  # clamp(e, -delta, delta)
    assert cm.gradients("quantile", e, tau=0.9).tolist() == pytest.approx([-0.9, -0.9, 0.1, 0.1])


def test_grid_helpers():
    x = np.array([1.0, 2.0, 4.0])
    assert cm.power_law_exponent(x, 3 * x**2) == pytest.approx(2.0)
    assert cm.power_law_exponent(x, np.full(3, 7.0)) == pytest.approx(0.0, abs=1e-12)
    e = cm.error_grid(2.0, 0.25)
    assert e.size == 17 and 0.0 in e and 1.0 in e and e[-1] == 2.0
    assert cm.plateau_start(e, np.minimum(np.abs(e), 1.5)) == 1.5
    assert cm.largest_jump([0.0, 0.1, 1.1, 1.2]) == pytest.approx(1.0)
    assert cm.ratio(6.0, 2.0) == 3.0 and cm.ratio(6.0, 0.0, floor=1e-3) == 6000.0
    assert cm.ratio(1.0, 0.0) == math.inf and math.isnan(cm.ratio(math.nan, 1.0))


def test_loss_only_measurements_match_their_closed_forms():
    m = cm.MEASURES["penalty_table"].fn([], {"misses": [1, 2, 4], "at": 4})
    assert m.values["mse_at"] == [16.0] and m.values["mae_at"] == [4.0]
    g = cm.MEASURES["gradient_flow"].fn([], cm.MEASURES["gradient_flow"].defaults)
    assert g.values["huber_switch"] == [1.5] and g.values["mse_over_mae_at_4"] == [8.0]  # 2*4 / 1
    lc = cm.MEASURES["log_cosh_limits"].fn([], cm.MEASURES["log_cosh_limits"].defaults)
    # log cosh e = e^2/2 - e^4/12 + ...: relative gap e^2/6 at e = 0.1; far out log(1 + exp(-2|e|)) at |e| = 5.
    assert lc.values["small_rel_error"][0] == pytest.approx(0.1**2 / 6, rel=1e-2)
    assert lc.values["large_abs_error"][0] == pytest.approx(math.log1p(math.exp(-10)), rel=1e-6)


def test_penalty_table_rejects_an_at_outside_the_misses():
    with pytest.raises(ValueError, match="at=5 is not one of the misses"):
        cm.MEASURES["penalty_table"].fn([], {"misses": [1, 2], "at": 5})


# ---------------------------------------------------------------------------------------------------
# Measurements on runs, with hand-made run records (known answers)


def _run(tmp_path, flat, summary, ds=None):
    cfg = config.from_flat({"train.figures": False, **flat})
    d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    if ds is not None:
        ds.save(d / "data.npz")
    return sweeps.Run(cfg, d.name, {}, d, {"status": "completed", "steps": 100, **summary})


def test_optimum_statistics_on_a_fixed_sample(tmp_path):
    # Sample with y = [0, 1, 2, 3, 10] (n = 5): mean 3.2, median 2, 0.8-quantile... set through the data file.
    ds = data.make("skewed", n=5, seed=0, slope=0.0)
    ds.y = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    sd = float(np.std([0.0, 1.0, 2.0, 3.0, 10.0]))
    base = {"model.kind": "constant", "data.kind": "skewed", "data.n": 5}
    runs = [_run(tmp_path, {**base, "loss.name": "mse"}, {"params": {"value": 3.2}}, ds),
            _run(tmp_path, {**base, "loss.name": "rmse"}, {"params": {"value": 3.2}}),
            _run(tmp_path, {**base, "loss.name": "mae"}, {"params": {"value": 2.5}}),  # not the median
            _run(tmp_path, {**base, "loss.name": "quantile", "loss.tau": 0.8}, {"params": {"value": 3.0}})]
    v = cm.MEASURES["optimum_statistics"].fn(runs, {}).values
    assert v["mse_vs_mean"][0] == pytest.approx(0.0, abs=1e-7)
    assert v["mae_vs_median"][0] == pytest.approx(0.5 / sd)
    assert v["mae_rank_error"][0] == pytest.approx(0.1)  # 3 of 5 points at or below 2.5: 0.6 - 0.5
    assert v["quantile_rank_error"][0] == pytest.approx(0.0)  # 4 of 5 at or below 3: exactly 0.8
    assert v["mean_median_gap"][0] == pytest.approx(1.2 / sd)


def test_outlier_shift_ratios(tmp_path):
    ds = data.make("outliers", n=20, seed=0, outlier_fraction=0.05)
    slopes = {("mse", 0.0): 2.0, ("mse", 0.05): 3.0, ("mae", 0.0): 2.0, ("mae", 0.05): 2.1,
              ("huber", 0.0): 2.0, ("huber", 0.05): 2.5}
    runs = [_run(tmp_path, {"data.kind": "outliers", "data.n": 20, "data.outlier_fraction": f, "loss.name": n},
                 {"params": {"slope": s, "intercept": 1.0}, "reference": {"params": {"slope": s, "intercept": 1.0}}},
                 ds) for (n, f), s in slopes.items()]
    v = cm.MEASURES["outlier_shift"].fn(runs, {"floor": 1e-6}).values
    assert v["mse_over_mae"][0] == pytest.approx(10.0) and v["mse_over_huber"][0] == pytest.approx(2.0)


def _huber_path_runs(tmp_path):
    """MAE fit (2, 1), MSE fit (2, 2); Huber fits at intercepts 1.0, 1.5, 1.4, 2.0 -> t = 0, 0.5, 0.4, 1."""
    def fit(b):
        return {"params": {"slope": 2.0, "intercept": b}}
    base = {"data.kind": "outliers"}
    runs = [_run(tmp_path, {**base, "loss.name": "mse"}, fit(2.0)), _run(tmp_path, {**base, "loss.name": "mae"}, fit(1.0))]
    runs += [_run(tmp_path, {**base, "loss.name": "huber", "loss.delta": d}, fit(b))
             for d, b in ((0.1, 1.0), (1.0, 1.5), (3.0, 1.4), (30.0, 2.0))]
    return runs


def test_huber_interpolation_positions(tmp_path):
    runs = _huber_path_runs(tmp_path)
    v = claim_training.huber_interpolation(runs, {}).values
    assert v["small_to_mae"] == [0.0] and v["large_to_mse"] == [0.0]
    assert v["max_backstep"][0] == pytest.approx(0.1) and v["separation"] == [1.0]


def test_a_run_that_did_not_complete_measures_as_nan(tmp_path):
    r = _run(tmp_path, {}, {"params": {"slope": 1.0}})
    r.summary["status"] = "failed"
    assert math.isnan(cm.fitted(r, "slope")) and math.isnan(cm.final(r, "loss/train"))
    assert math.isnan(cm.steps_to_converge(r))
    r.summary.update(status="completed", steps_to_converge=None)
    assert cm.steps_to_converge(r) == 101  # never converged: censored at steps + 1


def test_a_run_missing_from_the_grid_is_named(tmp_path):
    # A grid without a run a measurement looks up made the claim inconclusive with "measurement failed:
    # AttributeError: 'NoneType' object has no attribute 'dir'" (after training every other run).
    runs = [_run(tmp_path, {"loss.name": n, "seed": 0}, {"steps_to_converge": 10}) for n in ("mae", "huber")]
    st = claim_studies.Study(Path("convergence_speed.toml"), "6", "t", "g", "m", "convergence_speed", {},
                             [Check("mae_over_mse", min=1.25)])
    res = claims.evaluate(st, runs)
    assert res.verdict == "inconclusive" and [c.outcome for c in res.checks] == ["inconclusive"]
    assert res.error == ("measurement failed: the study has no run with loss.name='mse', seed=0 (its 2 runs have "
                         "loss.name 'mae', 'huber'; seed 0); add it to the study's [sweep]")
    # The measurements with their own look-ups name what they miss too (they measured it as NaN, silently).
    osc = [_run(tmp_path, {"loss.name": n, "seed": 0}, {}) for n in ("mae", "huber", "mse")]
    with pytest.raises(cm.MissingRun, match=r"loss.name='mae', seed=0, a decaying optim.schedule \(its 3 runs"):
        claim_training.oscillation(osc, cm.MEASURES["oscillation"].defaults)
    scale = [_run(tmp_path, {"loss.name": "mse", "data.target_scale": t}, {}) for t in (1.0, 1000.0)]
    with pytest.raises(cm.MissingRun, match="seed=0, train.normalize_targets=true"):
        claim_training.scale_sensitivity(scale, {})
    with pytest.raises(cm.MissingRun, match="no run with loss.name='huber'"):
        claim_training.huber_interpolation(osc[::2], {})


def test_oscillation_is_measured_from_the_final_row_when_no_curve_was_logged(tmp_path):
    # train.log_every = 0 logs no scalars (only the summary's final row): the close-up figure's
    # steps.max() on no steps failed the whole claim ("zero-size array to reduction operation maximum").
    def osc_run(name, amplitude, schedule="constant"):
        final = {"oscillation/param_amplitude": amplitude, "convergence/ref_param_error": amplitude / 2,
                 "oscillation/flip_rate": 0.5}
        return _run(tmp_path, {"loss.name": name, "optim.schedule": schedule, "train.log_every": 0},
                    {"final": final})

    runs = [osc_run("mae", 1e-2), osc_run("mae", 1e-5, "cosine"), osc_run("huber", 1e-4), osc_run("mse", 1e-6)]
    m = claim_training.oscillation(runs, cm.MEASURES["oscillation"].defaults)
    assert m.values["decay_ratio"] == [pytest.approx(1e3)] and m.values["huber_ratio"] == [pytest.approx(1e2)]
    assert m.plots["oscillation"]["traces"] == {}


# A run that did not complete is missing data: the seed's number is NaN whatever the order of the runs, and
# a claim measured only on such seeds is inconclusive, never 'holds' or 'does not hold'.


def test_huber_interpolation_with_a_failed_run_is_nan_for_that_seed(tmp_path):
    # As test_huber_interpolation_positions, but the delta = 3 run failed: t = 0, 0.5, NaN, 1. Python's
    # max([0.0, 0.5, nan, nan]) would say 0.0, a backstep-free path measured from half of it.
    runs = _huber_path_runs(tmp_path)
    runs[4].summary = {"status": "failed", "error": "ValueError: boom"}
    v = claim_training.huber_interpolation(runs, {}).values
    assert math.isnan(v["max_backstep"][0])
    assert v["small_to_mae"] == [0.0] and v["large_to_mse"] == [0.0]  # their inputs all completed
    assert judge(Check("max_backstep", max=0.2), v["max_backstep"], 0.75)[0] == "inconclusive"


@pytest.mark.parametrize("failed_tau", [0.2, 0.8])  # first or last in the max: the answer must not depend on it
def test_optimum_statistics_with_a_failed_quantile_run_is_nan(tmp_path, failed_tau):
    ds = data.make("skewed", n=5, seed=0, slope=0.0)
    ds.y = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    base = {"model.kind": "constant", "data.kind": "skewed", "data.n": 5}
    runs = [_run(tmp_path, {**base, "loss.name": "mse"}, {"params": {"value": 3.2}}, ds),
            _run(tmp_path, {**base, "loss.name": "rmse"}, {"params": {"value": 3.2}}),
            _run(tmp_path, {**base, "loss.name": "mae"}, {"params": {"value": 2.0}})]
    runs += [_run(tmp_path, {**base, "loss.name": "quantile", "loss.tau": t}, {"params": {"value": q}})
             for t, q in ((0.2, 0.0), (0.8, 3.0))]
    next(r for r in runs if r.config.loss.tau == failed_tau).summary = {"status": "failed"}
    v = cm.MEASURES["optimum_statistics"].fn(runs, {}).values
    assert math.isnan(v["quantile_rank_error"][0]) and math.isnan(v["quantile_vs_sample"][0])
    assert v["mae_rank_error"][0] == pytest.approx(0.1)  # 3 of 5 at or below 2: 0.6 - 0.5; unaffected


def _comparison_runs(tmp_path, failed_seeds):
    """mse and mae, clean and with outliers, seeds 0 and 1; the outlier run of mae fails in failed_seeds.
    Fitted lines: clean (2, 1); with outliers mse (2, 1.5), mae (2, 1.1): robustness 1 and 0.2."""
    runs = []
    for seed in (0, 1):
        for loss, shifted in (("mse", 1.5), ("mae", 1.1)):
            for fraction, b in ((0.0, 1.0), (0.1, shifted)):
                flat = {"data.kind": "outliers", "data.outlier_fraction": fraction, "loss.name": loss, "seed": seed}
                summary = {"params": {"slope": 2.0, "intercept": b}, "final": {"convergence/gap": 1e-4},
                           "reference": {"loss": 1.0}}
                r = _run(tmp_path, flat, summary)
                if seed in failed_seeds and loss == "mae" and fraction > 0:
                    r.summary = {"status": "failed", "error": "ValueError: boom"}
                runs.append(r)
    return runs


# Ratings these runs earn: robustness mse 1 (poor), mae 0.2 (excellent); smoothness by autograd on a 1e-3
# grid: mse jumps 2e-3 (excellent), mae's sign jumps 1 (poor); convergence 1e-4 (excellent); near zero
# mse |g| 0.02 / 2 = 0.01 (excellent), mae 1 (poor). The guide below agrees with every cell.
COMPARISON = {"losses": ["mse", "mae"],
              "thresholds": {"robustness": [0.5, 0.9], "smoothness": [0.01, 0.5], "convergence": [1e-3, 1e-2],
                             "near_zero": [0.1, 0.5]},
              "guide": {"mse": ["poor", "excellent", "excellent", "excellent"],
                        "mae": ["excellent", "poor", "excellent", "poor"]}}


def _comparison_claim(runs):
    spec = cm.MEASURES["comparison_table"]
    st = claim_studies.Study(Path("comparison_table.toml"), "11", "t", "g", "m", "comparison_table",
                             {**spec.defaults, **COMPARISON}, [Check("agreement", min=0.99)], 0.75)
    return claims.evaluate(st, runs)


def test_comparison_table_missing_cells_are_not_mismatches(tmp_path):
    res = _comparison_claim(_comparison_runs(tmp_path, failed_seeds=()))
    assert res.values["agreement"] == [1.0, 1.0] and res.values["mismatches"] == [0.0, 0.0]
    assert res.verdict == "holds"
    res = _comparison_claim(_comparison_runs(tmp_path, failed_seeds=(1,)))
    assert res.values["agreement"][0] == 1.0 and math.isnan(res.values["agreement"][1])
    assert math.isnan(res.values["mismatches"][1])
    assert res.verdict == "inconclusive"  # 1 of 2 seeds is below agree = 0.75


def test_comparison_table_with_failed_runs_in_every_seed_is_inconclusive(tmp_path):
    # Counting the unmeasured cell as a mismatch gave agreement 7/8 in both seeds: 'does not hold' from no data.
    res = _comparison_claim(_comparison_runs(tmp_path, failed_seeds=(0, 1)))
    assert all(math.isnan(v) for v in res.values["agreement"])
    assert res.checks[0].outcome == "inconclusive" and res.verdict == "inconclusive"
    assert res.statuses == {"completed": 6, "failed": 2}


def test_largest_is_nan_when_any_input_is():
    assert cm.largest([1.0, 3.0, 2.0]) == 3.0
    assert math.isnan(cm.largest([1.0, math.nan])) and math.isnan(cm.largest([math.nan, 1.0]))
    assert math.isnan(cm.largest([])) and cm.largest([], default=0.0) == 0.0


def test_comparison_ratings_and_line_shift(tmp_path):
    assert [claim_comparison._rate(v, [0.25, 0.6]) for v in (0.1, 0.25, 0.5, 0.7, math.nan)] == \
        ["excellent", "excellent", "moderate", "poor", "n/a"]
    a = _run(tmp_path, {}, {"params": {"slope": 2.0, "intercept": 1.0}})
    b = _run(tmp_path, {}, {"params": {"slope": 2.0, "intercept": 1.5}})
    assert claim_comparison._line_shift(a, b) == pytest.approx(0.5)  # parallel lines 0.5 apart


def test_read_scalars_reads_back_what_the_event_writer_wrote(tmp_path):
    with EventWriter(tmp_path) as w:
        w.add_scalar_block(["param/slope", "loss/train"], np.arange(3), np.array([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0]]))
        w.add_text("config", "ignored")
    got = cm.read_scalars(tmp_path, ("param/slope", "loss/train", "absent"))
    assert got["param/slope"][0].tolist() == [0, 1, 2] and got["param/slope"][1].tolist() == [1.0, 2.0, 3.0]
    assert got["loss/train"][1].tolist() == [9.0, 8.0, 7.0] and got["absent"][0].size == 0


def test_quick_values_of_zipped_keys_are_checked_as_the_sweeps_own(tmp_path):
    # [claim.quick] replaced a block's values unchecked: [["mse"]] for two zipped keys dropped seed silently,
    # and "mse" was zipped letter by letter ("seed: expected an integer, got 's'").
    base = '[[sweep]]\n"loss.name,seed" = [["mse", 0], ["mae", 1]]\n' + CLAIM + CHECK
    path = tmp_path / "q.toml"
    for quick, message in (('[claim.quick]\n"loss.name,seed" = [["mse"]]\n', "each value must be a list of 2"),
                           ('[claim.quick]\n"loss.name,seed" = "mse"\n', "each value must be a list of 2")):
        path.write_text(base + quick)
        with pytest.raises(ConfigError, match=message):
            claim_studies.load_study(path, quick=True)
    path.write_text(base + '[claim.quick]\n"loss.name,seed" = [["mae", 3]]\n')
    st = claim_studies.load_study(path, quick=True)
    assert [(c.loss.name, c.seed) for c, _ in st.grid] == [("mae", 3)]



# ---------------------------------------------------------------------------------------------------
# Interrupted runs, as lab claims records them (lab.trainer's results)


def test_an_interrupted_run_says_how_many_steps_it_trained(tmp_path):
    # An interrupted run's summary said steps = -1 beside a steps_to_converge it had reached. Full-batch
    # SGD on MSE: the gap, once within tolerance, stays there, so the step the interrupted run saw is the
    # completed run's. should_stop is polled at each flush, one per log step (0, 5, ..., 95): the 20th
    # poll stops the run at step 95, before that step's update, so it made 95 updates.
    cfg = config.from_flat({"data.kind": "clean", "data.n": 32, "train.steps": 200, "train.log_every": 5,
                            "optim.lr": 0.1, "train.figures": False})

    def train(cfg, polls_before_stop=None):
        polls = iter(range(10**6))
        stop = None if polls_before_stop is None else (lambda: next(polls) + 1 >= polls_before_stop)
        return trainer.train([cfg], [data.make("clean", n=32, seed=0)], flush_every=1, should_stop=stop)[0]

    full, cut = train(cfg), train(cfg, polls_before_stop=20)
    assert (full.status, full.steps) == ("completed", 200)
    assert (cut.status, cut.steps) == ("interrupted", 95)
    assert full.steps_to_converge is not None and 0 < full.steps_to_converge < 95
    assert cut.steps_to_converge == full.steps_to_converge
    # With minibatches the gap an interruption leaves may be one minibatch's: no convergence step is claimed.
    mini = config.from_flat({**config.to_flat(cfg), "train.batch_size": 8})
    cut = train(mini, polls_before_stop=20)
    assert (cut.status, cut.steps, cut.steps_to_converge) == ("interrupted", 95, None)



def test_ctrl_c_as_the_training_ends_still_writes_the_report(tmp_path, monkeypatch, capsys):
    # A Ctrl-C in the instant after the training returned, before the measuring began, found no handler
    # of lab claims: a bare "interrupted", exit 130 and no report. Now its handler is in place from the
    # start: the runs are trained (their summaries written), no claim is measured, and the report says so.
    folder = tmp_path / "experiments"
    folder.mkdir()
    shutil.copy(EXPERIMENTS / "optimum_statistics.toml", folder)  # a study that trains (quick: ~1 s)
    monkeypatch.setattr(claims, "EXPERIMENTS", folder)
    real = study.execute

    def train_then_ctrl_c(*args, **kw):
        result = real(*args, **kw)
        _ctrl_c()
        return result

    monkeypatch.setattr(study, "execute", train_then_ctrl_c)
    out = tmp_path / "out"
    assert cli.main(["claims", "--quick", "--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted while measuring: 0 of 1 claims measured, 0 figures drawn; report: {out / 'report.md'}")
    saved = json.loads((out / "claims.json").read_text())
    assert (saved["interrupted"], saved["interrupted_while"]) == (True, "measuring")  # (every run had ended)
    assert [(c["id"], c["verdict"], c["error"]) for c in saved["claims"]] == [
        ("2", "inconclusive", "not measured: interrupted")]
    summaries = [json.loads(p.read_text()) for p in (out / "runs").rglob("summary.json")]
    assert summaries and {s["status"] for s in summaries} == {"completed"}
    # (the report said "some runs did not finish", where every run had finished and no claim was measured)
    report = (out / "report.md").read_text()
    assert "**Interrupted** while measuring: claim 2 not measured (inconclusive); no figures drawn." in report
    assert "did not finish" not in report
