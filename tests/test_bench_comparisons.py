"""lab.bench_comparisons: the usual loop's subset of runs, and when its final parameters equal the lab's."""

import json

from lab import bench, bench_comparisons


def test_the_baseline_subset_spreads_over_every_loss_and_dataset():
    runs = bench.study_runs(bench.study_flat(steps=10), bench.study_sweep(seeds=3))  # 5 x 4 x 3 = 60 runs
    subset = bench_comparisons.baseline_subset(runs, 10)
    keys = [(r.config.loss.name, r.config.data.kind, r.config.seed) for r in subset]
    assert [k[0] for k in keys] == list(bench.LOSSES) * 2  # loss i mod 5, in the study's order
    assert [k[1] for k in keys] == [bench.DATASETS[i % 4] for i in range(10)]
    assert [k[2] for k in keys] == [i % 3 for i in range(10)]
    assert len(set(keys)) == 10  # 10 different runs


def _compare(tmp_path, loss: str, diff: float) -> bool:
    """The baseline's slope off the lab's by `diff`, for one run of `loss` (lab slope 2.0)."""
    run, = bench.study_runs(bench.study_flat(steps=10), {"loss.name": [loss], "data.kind": ["clean"], "seed": [0]})
    (tmp_path / run.name).mkdir(exist_ok=True)
    (tmp_path / run.name / "summary.json").write_text(json.dumps({"params": {"slope": 2.0, "intercept": 0.5}}))
    baseline = {"results": [{"name": run.name, "params": {"slope": 2.0 + diff, "intercept": 0.5}}]}
    return bench_comparisons.compare_params(baseline, [run], tmp_path)["same"]


def test_final_parameters_are_the_same_within_rounding_or_one_sign_flip(tmp_path):
    # Smooth losses: |diff| <= 1e-5 max(1, |theta|) = 2e-5 for a slope of 2. Sign-based losses: one point
    # on the other side of 0 moves a step by 2 lr max|x| / n = 2 * 0.05 * max|x| / 1000 (x_range of the
    # config), at least 1e-4 for |x| up to 1.
    cfg = bench.study_runs(bench.study_flat(steps=10), {"loss.name": ["mae"], "data.kind": ["clean"], "seed": [0]})[0].config
    sign_bound = 2 * 0.05 * max(abs(b) for b in cfg.data.x_range) / 1000
    assert _compare(tmp_path, "mse", 1.9e-5) and not _compare(tmp_path, "mse", 2.1e-5)
    assert _compare(tmp_path, "mae", 0.99 * sign_bound) and not _compare(tmp_path, "mae", 1.01 * sign_bound)
    assert sign_bound > 2.1e-5  # so the mae case above is not the smooth bound's
