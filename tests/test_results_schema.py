"""The results schema: rows that say what they are (summary, headline, direction, when), a version in every file,
older files read as before, newer ones refused in one line, and tables and figures that no row order can change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import save_tiny_model, write_text_docs

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.cli.order import registry_order
from unimem_bench.harness.evaluation import records
from unimem_bench.harness.reporting import results
from unimem_bench.harness.reporting.tables import sweep_tables, to_markdown
from unimem_bench.harness.runtime import environment as run_env
from unimem_bench.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")


def run_argv(root: Path, out: Path, *extra: str) -> list[str]:
    """Perplexity, pi-length (two lengths) and NIAH (a 2 x 2 grid) on the tiny random model: rows of every shape."""
    return ["run", "--model", str(root / "tiny"), "--tasks", "github,pi-length,niah", "--data-dir", str(root / "docs"),
            "--max-docs", "2", "--max-tokens", "160", "--segment-len", "32", "--out", str(out),
            "--task-arg", "github.min_chars=100", "--task-arg", "pi-length.lengths=64,128",
            "--task-arg", "pi-length.min_chars=100", "--task-arg", "niah.preset=story",
            "--task-arg", "niah.lengths=96,160", "--task-arg", "niah.depths=0,1", "--task-arg", "niah.max_new_tokens=4",
            *extra]


@pytest.fixture(scope="module")
def mixed_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two methods on three tasks, transformer_xl again at another window (a setting), and a two-point sweep."""
    import torch

    root = tmp_path_factory.mktemp("mixed")
    save_tiny_model(root / "tiny")
    write_text_docs(root / "docs", [1500, 1200])
    out = root / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(run_argv(root, out, "--methods", "vanilla,transformer_xl")) == 0
        assert cli.main(run_argv(root, out, "--methods", "transformer_xl", "--set", "reading.window=16")) == 0
        assert cli.main(["sweep", "--method", "transformer_xl", "--vary", "reading.window=8,24", "--model",
                         str(root / "tiny"), "--tasks", "github", "--data-dir", str(root / "docs"), "--max-docs", "2",
                         "--max-tokens", "160", "--segment-len", "32", "--task-arg", "github.min_chars=100",
                         "--name", "window", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_task_declares_its_headline_and_each_metric_direction():
    for name in TASKS.names():
        task = TASKS.get(name)
        assert task.headline in task.higher_is_better, name
        assert all(isinstance(v, bool) for v in task.higher_is_better.values()), name
    assert TASKS.get("pg19").higher_is_better["token_ppl"] is False
    assert TASKS.get("longbench").higher_is_better["score"] is True


def test_runs_write_versioned_rows_with_one_headline_each(mixed_results):
    raw = pd.read_csv(mixed_results / "leaderboard.csv", keep_default_na=False)
    assert list(raw.columns) == results.LEADERBOARD_COLUMNS and set(raw["schema"]) == {results.LEADERBOARD_SCHEMA}
    board = records.read_leaderboard(mixed_results / "leaderboard.csv")
    for rid, rows in board.groupby("run_id"):
        record = json.loads((mixed_results / "runs" / rid / "run.json").read_text())
        task = TASKS.get(record["task"])
        assert record["schema"] == results.RUN_SCHEMA and record["headline"] == task.headline
        assert record["higher_is_better"] == dict(task.higher_is_better)
        (headline,) = rows[rows["headline"]].itertuples()
        assert headline.metric == task.headline and headline.summary and headline.subtask == ""
        summary = rows[rows["summary"]]
        metrics = json.loads((mixed_results / "runs" / rid / "metrics.json").read_text())
        assert dict(zip(summary["metric"], summary["value"], strict=True)) == pytest.approx(metrics)
        assert all(rows["higher_is_better"] == rows["metric"].map(task.higher_is_better))
        assert set(rows["finished"]) == {record["finished"]}


def outputs(out: Path, plots: Path, capsys) -> dict[str, object]:
    """Everything `leaderboard` prints in each format, the sweep's table, and the bytes of every PNG `plot` draws."""
    found: dict[str, object] = {}
    for fmt in ("rich", "markdown", "csv"):
        assert cli.main(["leaderboard", "--out", str(out), "--format", fmt]) == 0
        found[fmt] = capsys.readouterr().out
    found["sweep"] = "\n".join(to_markdown(t) for t in sweep_tables(out, "window", registry_order()))
    assert cli.main(["plot", "--out", str(out), "--plots-dir", str(plots), "--formats", "png"]) == 0
    capsys.readouterr()
    found.update({p.name: p.read_bytes() for p in sorted(plots.rglob("*.png"))})
    return found


def test_reordered_leaderboard_changes_no_table_or_plot(mixed_results, tmp_path, capsys):
    path = mixed_results / "leaderboard.csv"
    original = path.read_bytes()
    try:
        before = outputs(mixed_results, tmp_path / "before", capsys)
        assert {"dots_token_ppl.png", "bars_accuracy.png", "sweep_window.png", "niah_methods.png",
                "pi_length_token_ppl_tiny.png"} <= set(before)
        assert "transformer_xl" in before["markdown"] and "reading.window=16" in before["markdown"]
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
        # Reversed, every column sorted backwards (later tasks, methods and runs first), and two random orders.
        backwards = frame.sort_values(list(frame.columns), ascending=False, kind="stable")
        for k, shuffled in enumerate([frame.iloc[::-1], backwards, frame.sample(frac=1.0, random_state=1),
                                      frame.sample(frac=1.0, random_state=2)]):
            assert not shuffled.index.equals(frame.index)
            shuffled.to_csv(path, index=False)
            after = outputs(mixed_results, tmp_path / f"after-{k}", capsys)
            assert after.keys() == before.keys()
            for name, value in before.items():
                assert after[name] == value, f"{name} changed when the rows were reordered ({k})"
    finally:
        path.write_bytes(original)


def test_best_cells_follow_each_rows_direction(mixed_results, capsys):
    assert cli.main(["leaderboard", "--out", str(mixed_results), "--format", "csv"]) == 0
    table = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out), dtype=str, keep_default_na=False)
    board = records.read_leaderboard(mixed_results / "leaderboard.csv")
    for task, metric in (("github", "token_ppl"), ("niah", "accuracy")):
        cells = table.loc[table["metric"] == metric, task]
        starred = [float(c.rstrip("*")) for c in cells if c.endswith("*")]
        values = board[(board["task"] == task) & board["headline"]]["value"]
        best = values.max() if metric == "accuracy" else values.min()
        assert starred and all(v == float(f"{best:.4g}") for v in starred), (task, cells.tolist())


def test_schema_1_files_read_as_their_readers_did_and_upgrade_on_write(tmp_path, capsys):
    """An unversioned file: each run's first row of a metric is its summary, its first metric the headline."""
    old = pd.DataFrame([
        ("a", "m", "vanilla", "pi-length", "", 128, "token_ppl", 30.0, 9),
        ("a", "m", "vanilla", "pi-length", "", 128, "tail_token_ppl", 40.0, 5),
        ("a", "m", "vanilla", "pi-length", "", 64, "token_ppl", 20.0, 4),
        ("b", "m", "rmt", "niah", "", 160, "accuracy", 0.5, 4),
        ("b", "m", "rmt", "niah", "depth=0.0", 96, "accuracy", 1.0, 1),
    ], columns=results.V1_COLUMNS)
    old.to_csv(tmp_path / "leaderboard.csv", index=False)
    board = records.read_leaderboard(tmp_path / "leaderboard.csv").set_index(["run_id", "metric", "context_len",
                                                                              "subtask"])
    assert board.loc[("a", "token_ppl", 128, ""), ["summary", "headline", "higher_is_better"]].tolist() == [
        True, True, False]
    assert board.loc[("a", "tail_token_ppl", 128, ""), ["summary", "headline"]].tolist() == [True, False]
    assert board.loc[("a", "token_ppl", 64, ""), ["summary", "headline"]].tolist() == [False, False]
    assert board.loc[("b", "accuracy", 160, ""), ["headline", "higher_is_better"]].tolist() == [True, True]
    assert cli.main(["leaderboard", "--out", str(tmp_path), "--format", "markdown"]) == 0
    assert "| vanilla | **30** |" in capsys.readouterr().out  # the 128-token summary, not the 64 breakdown
    records.merge_leaderboard(tmp_path / "leaderboard.csv", [{
        "run_id": "c", "model": "m", "method": "vanilla", "task": "niah", "subtask": "", "context_len": 160,
        "metric": "accuracy", "value": 0.25, "n": 4, "summary": True, "headline": True, "higher_is_better": True,
        "finished": run_env.now()}])
    raw = pd.read_csv(tmp_path / "leaderboard.csv", keep_default_na=False)
    assert list(raw.columns) == results.LEADERBOARD_COLUMNS and set(raw["schema"]) == {2} and len(raw) == 6
    assert raw.loc[raw["run_id"] == "a", "headline"].sum() == 1


def test_newer_schemas_fail_in_one_line(tmp_path, capsys):
    row = {"run_id": "a", "model": "m", "method": "vanilla", "task": "pg19", "subtask": "", "context_len": 9,
           "metric": "token_ppl", "value": 3.0, "n": 9, "summary": True, "headline": True,
           "higher_is_better": False, "finished": "", "schema": 3}
    pd.DataFrame([row]).to_csv(tmp_path / "leaderboard.csv", index=False)
    assert cli.main(["leaderboard", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert not captured.out and "leaderboard schema 3" in err and "upgrade" in err and "\n" not in err
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "run.json").write_text(json.dumps({"schema": 3}))
    with pytest.raises(results.ResultsFormatError, match="run record schema 3"):
        results.read_run_json(tmp_path, "a")
    (tmp_path / "leaderboard.csv").write_text("run_id,model\nx,y\n")
    assert cli.main(["leaderboard", "--out", str(tmp_path)]) == 2
    assert "lacks the column(s) method, task" in capsys.readouterr().err


def test_reporting_imports_neither_torch_nor_the_registries_nor_the_runner():
    code = ("import sys, unimem_bench.harness.reporting.figures, unimem_bench.harness.reporting.tables; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('unimem_bench.methods', "
            "'unimem_bench.tasks', 'unimem_bench.harness.evaluation', 'matplotlib.pyplot'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
