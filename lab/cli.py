"""The `lab` command line: run, sweep, report, claims, losses, config.

Every user mistake ends as one line on stderr and exit code 2 — never a traceback — and is found
before any training starts. Exit codes: 0 success, 1 a run failed, 2 bad input, 3 `lab run`
diverged, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
A training-behaviour lab for regression losses: MSE, MAE, Huber, log-cosh, quantile and the robust
family, trained for real on synthetic data whose truth is known, and measured (convergence to the
exact optimum, oscillation, gradient shares of outliers) in TensorBoard and summary tables."""

EPILOG = """\
examples:
  lab losses
  lab config
  lab config configs/outliers.toml loss.name=huber        show the resolved config, train nothing
  lab run configs/outliers.toml                           one run into runs/outliers
  lab run configs/clean.toml loss.name=huber loss.delta=0.5 optim.lr=0.1 --name huber-clean
  lab sweep configs/outliers.toml loss.name=mse,mae,huber seed=0,1,2
  lab sweep configs/sweep_losses.toml --resume            finish an interrupted sweep
  lab report runs/outliers --by loss.name                 mean ± std over seeds, one row per loss
  lab report runs --csv table.csv --markdown table.md
  tensorboard --logdir runs                               scalars, HParams, custom scalars

configs:
  Config files are TOML (configs/ holds presets); `lab config` lists every key. KEY=VALUE words
  after the file override it with dotted keys and TOML values: train.steps=500, loss.delta=0.5,
  model.hidden=[64,64], data.leverage=true, loss.name=huber. In `lab sweep` a comma list sweeps
  (loss.name=mse,mae  loss.tau=0.1,0.9  model.hidden=[32],[64,64]); a [sweep] table in the file
  does the same ("loss.name" = ["mse", "mae"]). Runs that share a model shape, data size and
  step count train together as one population.

run directories:
  runs/<name>/ for `lab run`; runs/<sweep name>/<data.kind>-<loss.name>[-<key><value>]-s<seed>/
  for sweeps (a new name gets -2, -3, ...: nothing is overwritten). Each holds config.toml,
  summary.json, data.npz, a TensorBoard event file and (single runs) figures/.

exit codes: 0 ok, 1 a run failed, 2 bad input, 3 the run diverged, 130 interrupted.
"""


class UsageError(Exception):
    """Bad input; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits 2; keep it to one line
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lab", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    raw = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser("run", help="train one run", formatter_class=raw,
                         description="Train one run and write its run directory.",
                         epilog="example:\n  lab run configs/outliers.toml loss.name=huber train.steps=500")
    run.add_argument("config", help="TOML config file (configs/ holds presets)")
    run.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. loss.delta=0.5")
    run.add_argument("--runs-dir", default="runs", help="parent of run directories (default: runs)")
    run.add_argument("--name", help="run directory name (default: the config's name)")
    run.add_argument("--no-figures", action="store_true", help="skip the end-of-run figures")

    sw = sub.add_parser("sweep", help="train the grid of a sweep", formatter_class=raw,
                        description="Train every combination of the swept values, in as few populations as\n"
                                    "possible; each run gets its own directory below runs/<name>/.",
                        epilog="examples:\n  lab sweep configs/outliers.toml loss.name=mse,mae,huber seed=0,1,2\n"
                               "  lab sweep configs/sweep_losses.toml --resume")
    sw.add_argument("config", help="TOML config file (its [sweep] table lists values)")
    sw.add_argument("overrides", nargs="*", default=[], metavar="KEY=V1,V2", help="a value, or a comma list of values to sweep")
    sw.add_argument("--runs-dir", default="runs", help="parent of the sweep directory (default: runs)")
    sw.add_argument("--name", help="sweep directory name (default: the config's name)")
    sw.add_argument("--resume", action="store_true",
                    help="continue in the existing sweep directory; skip runs whose summary.json says completed")

    rep = sub.add_parser("report", help="table over finished runs", formatter_class=raw,
                         description="One table over the runs below DIR: swept keys, status, final metrics,\n"
                                     "fitted parameters, steps to converge.",
                         epilog="example:\n  lab report runs/outliers --by loss.name --csv outliers.csv")
    rep.add_argument("dir", help="directory holding run directories (searched recursively)")
    rep.add_argument("--by", help="aggregate (mean ± std) over the other keys, grouped by these comma-separated keys")
    rep.add_argument("--csv", help="also write the table as CSV")
    rep.add_argument("--markdown", help="also write the table as Markdown")

    cl = sub.add_parser("claims", help="measure every claim of the guide",
                        description="Run the studies in experiments/ and print each claim's measurement and verdict.")
    cl.add_argument("--quick", action="store_true", help="fewer seeds and steps (under 2 minutes on 2 cores)")
    cl.add_argument("--out", default="runs/claims", help="output directory (default: runs/claims)")
    cl.add_argument("--only", help="only these claims, by id, comma-separated (e.g. 3,7a)")

    sub.add_parser("losses", help="list every loss with its formula and parameters")
    cfg = sub.add_parser("config", help="list every config key, or show a config resolved",
                         description="Without arguments: every config key with its default and meaning. With a "
                                     "config file (and overrides): the resolved config as TOML, nothing trained.")
    cfg.add_argument("config", nargs="?", help="TOML config file to resolve")
    cfg.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        # parse_known_args lets KEY=VALUE words come after options too (`lab run c.toml --name x a=1`).
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        stray = [w for w in extra if w.startswith("-") or not hasattr(args, "overrides")]
        if stray:
            raise UsageError(f"lab {args.command}: unrecognized arguments: {' '.join(stray)} (see lab {args.command} --help)")
        if extra:
            args.overrides = list(args.overrides) + extra
        return _dispatch(args)
    except UsageError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The `lab` command (and `python -m lab`): main(), then exit without the interpreter's teardown.

    By the time main() returns every file is written and closed (event files, summaries and figures are
    written synchronously, no writer thread is left), so what the teardown would still do is free
    torch's and numpy's objects and unload modules: ~0.5 s, a tenth of a 200-run study (2 cores).
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # (None: the command started with that descriptor closed, `>&-`)
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream, a full disk: nothing left to say
            pass
    os._exit(code)


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def _dispatch(args) -> int:
    from lab import cli_train  # imported here, as the rest: `lab --help` stays fast (no config, no torch)
    from lab.config import ConfigError

    try:
        if args.command == "losses":
            from lab import losses
            print(losses.describe())
            return 0
        if args.command == "config":
            return _config(args)
        if args.command == "run":
            return cli_train.run(args)
        if args.command == "sweep":
            return cli_train.sweep(args)
        if args.command == "report":
            from lab import report
            return report.main(args)
        if args.command == "claims":
            from lab import claims
            return claims.main(args)
    except BrokenPipeError:  # the reader left (`| head`): main() ends quietly, every result is written
        raise
    except (ConfigError, ValueError, OSError) as e:
        return _fail(str(e))
    raise UsageError(f"unknown command {args.command!r}")


def _config(args) -> int:
    from lab import config

    if args.config is None:
        if args.overrides:
            raise UsageError("lab config: KEY=VALUE words need a config file first")
        print("config keys (TOML sections [data], [model], [loss], [optim], [train]; top-level name, seed, "
              "device, dtype; '-' means the loss's or data kind's own default):\n" + config.describe())
        return 0
    import tomli_w

    from lab import cli_train

    cli_train.refuse_claim_study(args.config)
    cfg, sweep = config.load(args.config, args.overrides)
    if sweep:
        from lab import sweeps
        runs = sweeps.sweep_runs(cfg, sweep)
        print(f"# a sweep of {len(runs)} runs over " + ", ".join(sweep) + "; the base config:")
    print(tomli_w.dumps(config.to_dict(cfg)), end="")
    return 0
