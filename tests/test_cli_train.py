"""lab.cli_train's pieces on their own: the KEY=V1,V2 splitting, the progress display and the one-line
summary. `lab run` and `lab sweep` themselves are tested end to end through lab.cli in tests/test_cli.py."""

import io
from pathlib import Path

import pytest

from lab import cli_train


@pytest.mark.parametrize("text,values", [
    ("mse,mae", ["mse", "mae"]),
    ("[32],[64,64]", ["[32]", "[64,64]"]),
    ("[0.1,0.9]", ["[0.1,0.9]"]),
    ('"a,b",c', ['"a,b"', "c"]),
])
def test_split_values_respects_brackets_and_quotes(text, values):
    assert cli_train.split_values(text) == values


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    class FakeRun:
        name, dir, summary = "clean-mse-s0", Path("runs/x/clean-mse-s0"), {"status": "completed"}

    bar, lines = cli_train._Progress(2, Tty()), cli_train._Progress(2, io.StringIO())
    for p in (bar, lines):
        p.done(FakeRun())
        p.done(FakeRun())
        p.close()
    assert bar.stream.getvalue().count("\r[") == 2 and bar.stream.getvalue().count("\n") == 1
    assert lines.stream.getvalue().splitlines()[1].startswith("[2/2] runs/x/clean-mse-s0  completed")


def test_one_line_summary_formats_like_the_report():
    s = {"status": "completed", "final": {"loss/train": 0.281234, "convergence/gap": float("nan")},
         "params": {"slope": 2.0, "intercept": 123456.7}, "steps_to_converge": None}
    assert cli_train.one_line_summary(s) == ("completed  loss=0.2812  gap=-  slope=2 intercept=1.235e+05  "
                                       "steps_to_converge=-")
