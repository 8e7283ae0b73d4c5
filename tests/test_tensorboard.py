"""A real TensorBoard server over a small sweep: every run, tag, value, hparam and chart is served.

One server (127.0.0.1, a port the OS picks, data loaded before it starts serving) is shared by the
tests of this module and stopped at the end. Expected values come from each run's summary.json,
which lab.study writes from the same trainer results as the event file.
"""

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from lab import cli, metrics, rundir

SWEEP = """\
name = "tb"
device = "cpu"
[data]
kind = "outliers"
n = 40
n_val = 20
[train]
steps = 20
log_every = 10
hist_every = 10
figures = false
"""
RUNS = ["tb/outliers-huber-s0", "tb/outliers-huber-s1", "tb/outliers-mse-s0", "tb/outliers-mse-s1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, runs dir) of a TensorBoard serving a 2x2 sweep (loss x seed)."""
    root = tmp_path_factory.mktemp("tensorboard")
    config = root / "tb.toml"
    config.write_text(SWEEP)
    assert cli.main(["sweep", str(config), "loss.name=mse,huber", "seed=0,1", "--runs-dir", str(root / "runs")]) == 0
    log = root / "tensorboard.log"
    with open(log, "w") as stderr:
        # --port 0: the OS picks a free port (no race); reload_task=blocking with reload_interval=0
        # loads every event file once, before the server prints its address and starts serving.
        proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(root / "runs"),
                                 "--host", "127.0.0.1", "--port", "0", "--load_fast", "false",
                                 "--reload_interval", "0", "--reload_task", "blocking"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None:
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
            if found:
                url = f"http://127.0.0.1:{found.group(1)}"
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TensorBoard did not start: {log.read_text()[-2000:]}")
            else:
                time.sleep(0.1)
        yield url, root / "runs"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(url, path, **query):
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def post(url, path, body):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def summary(runs_dir, run):
    return rundir.read_summary(runs_dir / run)


def test_every_run_is_served_once(server):
    url, _ = server
    assert sorted(get(url, "/data/runs")) == RUNS


def test_every_tag_is_served_for_every_run(server):
    url, _ = server
    tags = get(url, "/data/plugin/scalars/tags")
    expected = set(metrics.SCALAR_TAGS) | {"param/slope", "param/intercept"}
    for run in RUNS:
        assert expected <= set(tags[run]), run
        assert {t.split("/")[0] for t in tags[run]} >= {"loss", "grad", "convergence", "oscillation", "residual"}


@pytest.mark.parametrize("tag", ["loss/train", "grad/norm", "oscillation/flip_rate", "param/slope"])
def test_scalars_are_the_logged_values(server, tag):
    url, runs_dir = server
    for run in RUNS:
        points = get(url, "/data/plugin/scalars/scalars", run=run, tag=tag)
        assert [p[1] for p in points] == [0, 10, 20]  # log_every = 10 over 20 steps, and the last step
        assert points[-1][2] == pytest.approx(summary(runs_dir, run)["final"][tag], rel=1e-6)
    slope = get(url, "/data/plugin/scalars/scalars", run=RUNS[0], tag="param/slope")[-1][2]
    assert slope == pytest.approx(summary(runs_dir, RUNS[0])["params"]["slope"], rel=1e-6)


def test_histograms_are_served_for_every_run(server):
    # hist_every = 10 over 20 steps: histograms at steps 0, 10 and the last step (as the scalars), of
    # each run's n = 40 training residuals and 40 per-sample gradient magnitudes (the sweep's config).
    url, _ = server
    tags = get(url, "/data/plugin/histograms/tags")
    for run in RUNS:
        assert set(tags[run]) == set(metrics.HIST_TAGS), run
        for tag in metrics.HIST_TAGS:
            served = get(url, "/data/plugin/histograms/histograms", run=run, tag=tag)
            assert [step for _, step, _ in served] == [0, 10, 20]
            for _, _, buckets in served:
                assert sum(count for _, _, count in buckets) == pytest.approx(40)
                lefts = [left for left, _, _ in buckets]
                assert lefts == sorted(lefts)


def test_hparams_list_each_run_once_with_its_swept_keys_and_final_metrics(server):
    url, runs_dir = server
    experiment = post(url, "/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {"loss.name", "seed", "data.kind", "optim.lr"} <= {h["name"] for h in experiment["hparamInfos"]}
    assert {"final/loss_train", "final/gap"} <= {m["name"]["tag"] for m in experiment["metricInfos"]}
    groups = post(url, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
    assert groups["totalSize"] == 4
    by_run = {g["sessions"][0]["name"]: g for g in groups["sessionGroups"]}
    assert sorted(by_run) == RUNS
    for run, group in by_run.items():
        s = summary(runs_dir, run)
        assert group["hparams"]["loss.name"] == s["swept"]["loss.name"]
        assert group["hparams"]["seed"] == s["swept"]["seed"]
        final = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert final["final/loss_train"] == pytest.approx(s["final"]["loss/train"], rel=1e-6)


def test_custom_scalars_put_one_metric_of_all_runs_on_one_chart(server):
    url, runs_dir = server
    layout = get(url, "/data/plugin/custom_scalars/layout")
    charts = {c["title"]: (cat["title"], c["multiline"]["tag"]) for cat in layout["category"] for c in cat["chart"]}
    for tag in ("loss/train", "grad/norm", "oscillation/flip_rate", "convergence/gap"):
        assert charts[tag] == (tag.split("/")[0], [f"^{tag}$"])
    titles = [c["title"] for cat in layout["category"] for c in cat["chart"]]
    assert len(titles) == len(metrics.SCALAR_TAGS) + 2  # each chart once, though every run wrote the layout
    # The chart's regex serves that tag for every run (the chart draws one line per run).
    for run in RUNS:
        served = get(url, "/data/plugin/custom_scalars/scalars", run=run, tag="^loss/train$")
        assert served["regex_valid"] and list(served["tag_to_events"]) == ["loss/train"]
        assert served["tag_to_events"]["loss/train"][-1][2] == pytest.approx(
            summary(runs_dir, run)["final"]["loss/train"], rel=1e-6)
