"""Sweeps: axes and presets, every point a normal run, skipping, interrupt and resume, parallel and Ray workers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import interrupt_task_run, one_line_error, sweep_argv, write_text_docs

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.evaluation import records
from unimem_bench.harness.models.exports import read_saved_method
from unimem_bench.harness.sweeps.plan import point_values
from unimem_bench.harness.sweeps.presets import PRESETS, Axis, layer_thirds, parse_vary, split_values
from unimem_bench.methods import ConfigError, MethodContext
from unimem_bench.methods.config import parse_layers
from unimem_bench.tasks import TASKS


def test_values_split_outside_brackets_and_points_form_a_grid_or_pairs():
    assert split_values("0-1,[0,2],all") == ["0-1", "[0,2]", "all"]
    assert parse_vary("injection.layers=0-1,[0,2],all") == Axis("injection.layers", ("0-1", "[0,2]", "all"))
    axes = (parse_vary("reading.topk=0,4,8"), parse_vary("reading.window=16,32,64"))
    grid = point_values(axes, zipped=False)
    assert len(grid) == 9 and len({tuple(p.items()) for p in grid}) == 9
    assert point_values(axes, zipped=True) == [{"reading.topk": t, "reading.window": w}
                                               for t, w in (("0", "16"), ("4", "32"), ("8", "64"))]
    with pytest.raises(ConfigError, match="as many values"):
        point_values((axes[0], parse_vary("reading.window=16")), zipped=True)


@pytest.mark.parametrize("n_layers", [3, 5, 22, 32])
def test_layer_thirds_cover_every_layer_in_three_contiguous_near_equal_groups(n_layers):
    groups = [parse_layers(g) for g in layer_thirds(n_layers)]
    assert len(groups) == 3
    assert [i for g in groups for i in g] == list(range(n_layers))
    assert all(g == tuple(range(g[0], g[-1] + 1)) for g in groups)
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_position_reading_presets_scale_with_the_segment():
    ctx = MethodContext(n_layers=5, segment_len=128, trained_context=512)
    assert PRESETS["sinks"].axes(ctx) == [Axis("reading.global_tokens", ("1", "2", "4", "8"))]
    # BigBird's block of 64 per 2,048 is 4 per 128: 0 to 4 blocks of random slots.
    assert PRESETS["random-slots"].axes(ctx) == [Axis("reading.random_slots", ("0", "4", "8", "12", "16"))]


def test_layer_placement_preset_on_five_layers():
    axes = PRESETS["layer-placement"].axes(MethodContext(n_layers=5, segment_len=128, trained_context=512))
    # The third "4" is the single layer 4: one point, not two.
    assert axes == [Axis("injection.layers", ("0", "1", "2", "3", "4", "0-1", "2-3", "all"))]


@pytest.mark.parametrize(("args", "message"), [
    (["--vary", "reading.topk"], "must look like section.field=v1,v2"),
    (["--vary", "topk=1,2"], "must look like section.field"),
    (["--vary", "reading.nope=1,2"], "reading has no field 'nope'"),
    (["--vary", "reading.topk=4,4"], "a value is repeated"),
    (["--vary", "injection.layers=1,7"], "(unimix): injection.layers=7 names layer 7 but the model has 3"),
    (["--vary", "reading.topk=0,4", "--vary", "reading.window=0", "--zip"], "as many values"),
    (["--methods", "unimixx", "--vary", "reading.topk=4"], "did you mean 'unimix'"),
    ([], "needs --preset NAME or at least one --vary"),
    (["--vary", "reading.topk=4", "--ray-address", "auto"], "--ray-address only applies with --backend ray"),
    (["--vary", "reading.topk=4", "--finetune", "/no/recipe.yaml"], "--recipe /no/recipe.yaml: no such file"),
])
def test_bad_sweeps_fail_in_one_line_before_model_work(capsys, tiny_model_dir, tmp_path, no_model_work, args,
                                                        message):
    out = one_line_error(capsys, sweep_argv(tiny_model_dir, tmp_path, *args))
    assert message in out, out


def test_sweep_points_are_normal_runs_and_a_rerun_skips_them(sweep_results_dir, tiny_model_dir, tmp_path, capsys):
    sweep = yaml.safe_load(next((sweep_results_dir / "sweeps").glob("layer-placement-*.yaml")).read_text())
    assert sweep["axes"] == {"injection.layers": ["0", "1", "2", "all"]} and sweep["base"]["model_layers"] == 3
    board = records.read_leaderboard(sweep_results_dir / "leaderboard.csv")
    for point in sweep["points"]:
        assert records.is_finished(sweep_results_dir, point["runs"]["github"])
    # A point equals `unimem-bench run --set field=value`: same run id, same numbers.
    point = sweep["points"][1]
    argv = sweep_argv(tiny_model_dir, tmp_path, "--set", f"injection.layers={point['values']['injection.layers']}")
    argv[0], argv[1] = "run", "--methods"
    assert cli.main(argv) == 0
    alone = records.read_leaderboard(tmp_path / "leaderboard.csv")
    assert list(alone["run_id"].unique()) == [point["runs"]["github"]]
    mine = board[board["run_id"] == point["runs"]["github"]].set_index("metric")["value"]
    assert alone.set_index("metric")["value"].to_dict() == mine.to_dict()
    capsys.readouterr()
    rows = len(board)
    assert cli.main(sweep_argv(tiny_model_dir, sweep_results_dir, "--preset", "layer-placement")) == 0
    assert "4 finished or duplicate: skipped; 0 to run" in " ".join(capsys.readouterr().err.split())
    assert len(records.read_leaderboard(sweep_results_dir / "leaderboard.csv")) == rows


def test_a_saved_sweep_definition_reruns_with_config(sweep_results_dir, capsys, no_model_work):
    """`sweep --config <out>/sweeps/<name>.yaml` is the same sweep: same name, every point already finished; a flag
    given with it wins over the saved one (here --workers, which the definition leaves out, and --name)."""
    for path in sorted((sweep_results_dir / "sweeps").glob("*.yaml")):
        saved = yaml.safe_load(path.read_text())
        assert saved["flags"]["method"] == "unimix" and "workers" not in saved["flags"]
        capsys.readouterr()
        assert cli.main(["sweep", "--config", str(path)]) == 0
        assert f"sweep {saved['name']}: " in capsys.readouterr().err
        assert yaml.safe_load(path.read_text())["points"] == saved["points"]
    out = one_line_error(capsys, ["sweep", "--config", str(path), "--name", "x/y"])
    assert "--name 'x/y' must be a plain file name" in out


def test_parallel_workers_write_the_rows_a_serial_run_writes(sweep_results_dir, tiny_model_dir, tmp_path):
    """The top-k sweep of the fixture ran in 2 worker processes: every point has all its rows, equal to a run."""
    points = pd.read_csv(next((sweep_results_dir / "sweeps").glob("topk-*.csv")), dtype=str)
    board = records.read_leaderboard(sweep_results_dir / "leaderboard.csv")
    metrics = set(board["metric"])
    for rid in points["run_id"]:
        assert set(board.loc[board["run_id"] == rid, "metric"]) == metrics
    assert not board.duplicated(["run_id", "metric", "subtask", "context_len"]).any()
    argv = sweep_argv(tiny_model_dir, tmp_path, "--set", "reading.topk=8")
    argv[0], argv[1] = "run", "--methods"
    assert cli.main(argv) == 0
    alone = records.read_leaderboard(tmp_path / "leaderboard.csv")
    rid = alone["run_id"].iloc[0]
    assert rid == points.loc[points["reading.topk"] == "8", "run_id"].item()
    # Workers run one torch thread each: float32 sums may differ from a multi-threaded run in the last digits.
    key = ["metric", "subtask", "context_len"]  # one row per metric of each breakdown (position buckets)
    expected = board[board["run_id"] == rid].set_index(key)["value"]
    assert alone.set_index(key)["value"].to_dict() == pytest.approx(expected.to_dict(), rel=1e-6)


def test_interrupted_sweep_resumes_without_recomputing_or_losing_rows(tiny_model_dir, tmp_path, monkeypatch,
                                                                     capsys):
    task = TASKS.get("github")
    real_run = type(task).run
    interrupt_task_run(monkeypatch, task, on_call=2)
    argv = sweep_argv(tiny_model_dir, tmp_path, "--vary", "reading.topk=0,4,8", "--name", "resume")
    assert cli.main(argv) == 130
    done = records.read_leaderboard(tmp_path / "leaderboard.csv")
    assert done["run_id"].nunique() == 1
    stamps = {rid: (tmp_path / "runs" / rid / "metrics.json").stat().st_mtime_ns for rid in done["run_id"].unique()}
    monkeypatch.setattr(type(task), "run", real_run)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "1 finished or duplicate: skipped; 2 to run" in " ".join(capsys.readouterr().err.split())
    board = records.read_leaderboard(tmp_path / "leaderboard.csv")
    points = pd.read_csv(tmp_path / "sweeps" / "resume.csv", dtype=str)
    assert set(board["run_id"]) == set(points["run_id"])
    assert not board.duplicated(["run_id", "metric", "subtask", "context_len"]).any()
    assert pd.concat([done, board]).drop_duplicates().shape[0] == len(board)  # the first rows are kept unchanged
    for rid, stamp in stamps.items():
        assert (tmp_path / "runs" / rid / "metrics.json").stat().st_mtime_ns == stamp


def test_a_failing_point_is_reported_and_the_others_are_recorded(tiny_model_dir, tmp_path, monkeypatch, capsys):
    task = TASKS.get("github")
    real_run = type(task).run
    calls = []

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(type(task), "run", fail_second)
    assert cli.main(sweep_argv(tiny_model_dir, tmp_path, "--vary", "reading.topk=0,4,8", "--name", "f")) == 1
    out = " ".join(capsys.readouterr().err.split())
    assert "unimix reading.topk=4 failed" in out and "RuntimeError: out of memory" in out and "1 point(s) failed" in out
    points = pd.read_csv(tmp_path / "sweeps" / "f.csv", dtype=str)
    done = set(records.read_leaderboard(tmp_path / "leaderboard.csv")["run_id"])
    assert done == set(points.loc[points["reading.topk"] != "4", "run_id"])


def test_a_name_holding_another_sweep_is_refused(tiny_model_dir, sweep_results_dir, capsys, no_model_work):
    name = next((sweep_results_dir / "sweeps").glob("topk-*.yaml")).stem
    assert cli.main(sweep_argv(tiny_model_dir, sweep_results_dir, "--vary", "reading.topk=0,2", "--name", name)) == 2
    assert "already exists" in capsys.readouterr().err


def test_finetuned_sweep_trains_each_point_then_evaluates_its_export(tiny_model_dir, tmp_path, capsys):
    docs = write_text_docs(tmp_path / "docs", [900] * 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": str(docs), "tokens": 96, "batch_size": 1, "lr": 1e-3, "eval_every": 0,
                                      "eval_docs": 1, "eval_tokens": 64, "precision": "fp32", "device": "cpu",
                                      "out": str(tmp_path / "unused")}))
    argv = sweep_argv(tiny_model_dir, tmp_path / "out", "--vary", "reading.topk=0,4", "--finetune", str(recipe))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend
    try:
        assert cli.main(argv) == 0
        capsys.readouterr()
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "2 finished or duplicate: skipped; 0 to run" in " ".join(capsys.readouterr().err.split())
    definition = yaml.safe_load(next((tmp_path / "out" / "sweeps").glob("*.yaml")).read_text())
    board = records.read_leaderboard(tmp_path / "out" / "leaderboard.csv")
    for point in definition["points"]:
        export = Path(point["finetune"]) / "model"
        saved = read_saved_method(export)
        assert saved.method == "unimix" and saved.config.reading.topk == int(point["values"]["reading.topk"])
        rows = board[board["run_id"] == point["runs"]["github"]]
        assert set(rows["model"]) == {f"hf:{export.resolve()}"} and len(rows) > 0
    assert len({p["finetune"] for p in definition["points"]}) == 2


MERGER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from unimem_bench.harness.evaluation.records import merge_leaderboard
    path, who = Path(sys.argv[1]), sys.argv[2]
    for i in range(25):
        merge_leaderboard(path, [{"run_id": f"{who}-{i}", "model": "m", "method": "x", "task": "t", "subtask": "",
                                  "context_len": 0, "metric": "token_ppl", "value": float(i), "n": 1,
                                  "summary": True, "headline": True, "higher_is_better": False, "finished": ""}])
""")


def test_concurrent_leaderboard_merges_lose_no_rows(tmp_path):
    path = tmp_path / "leaderboard.csv"
    procs = [subprocess.Popen([sys.executable, "-c", MERGER, str(path), f"w{k}"]) for k in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    board = records.read_leaderboard(path)
    assert sorted(board["run_id"]) == sorted(f"w{k}-{i}" for k in range(3) for i in range(25))


@pytest.mark.slow
def test_ray_backend_writes_the_rows_of_a_local_sweep(tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    local, remote = tmp_path / "local", tmp_path / "ray"
    args = ["--vary", "reading.topk=0,4,8", "--name", "topk"]
    assert cli.main(sweep_argv(tiny_model_dir, local, *args)) == 0
    assert cli.main(sweep_argv(tiny_model_dir, remote, *args, "--backend", "ray", "--workers", "2")) == 0
    key = ["run_id", "metric"]
    a = records.read_leaderboard(local / "leaderboard.csv").sort_values(key).reset_index(drop=True)
    b = records.read_leaderboard(remote / "leaderboard.csv").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="finished"), b.drop(columns="finished"), check_exact=False,
                                  rtol=1e-6)  # Ray tasks run one torch thread
    for rid in a["run_id"].unique():
        assert {f.name for f in (local / "runs" / rid).iterdir()} == {f.name for f in (remote / "runs" / rid).iterdir()}
        assert (local / "runs" / rid / "config.yaml").read_text() == (remote / "runs" / rid / "config.yaml").read_text()
        assert json.loads((remote / "runs" / rid / "run.json").read_text())["run_id"] == rid
