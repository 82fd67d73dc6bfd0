"""Leaderboard tables, figures and the analysis notebooks, on results the tests make with the tiny model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib.image
import nbformat
import pandas as pd
import pytest
import yaml
from helpers import one_line_error
from nbclient import NotebookClient

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.evaluation import records
from unimem_bench.harness.reporting import tables as lb
from unimem_bench.methods.config import parse_layers

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def sweep_frame(out: Path, prefix: str, metric: str = "token_ppl") -> tuple[dict, pd.DataFrame]:
    """A saved sweep and its points joined with their leaderboard rows, computed here from the raw files."""
    definition = yaml.safe_load(next((out / "sweeps").glob(f"{prefix}-*.yaml")).read_text())
    points = pd.read_csv(out / "sweeps" / f"{definition['name']}.csv", dtype=str, keep_default_na=False)
    board = pd.read_csv(out / "leaderboard.csv", keep_default_na=False)
    board = board[(board["metric"] == metric) & (board["subtask"] == "")][["run_id", "value"]]  # headline rows
    return definition, points.merge(board, on="run_id")


def test_leaderboard_marks_the_best_of_each_column(sweep_results_dir, capsys):
    md, csv = sweep_results_dir / "board.md", sweep_results_dir / "board.csv"
    assert cli.main(["leaderboard", "--out", str(sweep_results_dir), "--markdown", str(md), "--csv", str(csv)]) == 0
    board = pd.read_csv(sweep_results_dir / "leaderboard.csv", keep_default_na=False)
    ppl = board[(board["metric"] == "token_ppl") & (board["subtask"] == "")]
    best = ppl["value"].min()
    table = pd.read_csv(csv, dtype=str)
    starred = table[table["github"].str.endswith("*")]
    assert len(starred) >= 1 and all(float(v.rstrip("*")) == float(f"{best:.4g}") for v in starred["github"])
    # One row per distinct run (setting): the config fields that differ name them.
    assert len(table) == ppl["run_id"].nunique()
    assert table["setting"].is_unique and table["setting"].str.contains("injection.layers=").all()
    text = md.read_text()
    assert text.count("**") == 2 * (1 + len(starred)) and "| method | setting | github |" in text
    assert "token_ppl" in capsys.readouterr().out


def test_settings_are_the_swept_values_within_a_sweep(sweep_results_dir):
    definition, points = sweep_frame(sweep_results_dir, "layer-placement")
    settings = lb.run_settings(sweep_results_dir, lb.load(sweep_results_dir, run_ids=list(points["run_id"])))
    for _, point in points.iterrows():
        layers = point["injection.layers"]
        assert settings[point["run_id"]] == f"injection.layers={layers}"
        config = records.read_run_config(sweep_results_dir, point["run_id"])
        assert config["injection"]["layers"] == ("all" if layers == "all" else list(parse_layers(layers)))


def test_leaderboard_filters_fail_in_one_line(sweep_results_dir, capsys):
    out = one_line_error(capsys, ["leaderboard", "--out", str(sweep_results_dir), "--tasks", "pg19"])
    assert "no rows with task ['pg19'] (it has: github)" in out
    out = one_line_error(capsys, ["leaderboard", "--out", str(sweep_results_dir / "nowhere")])
    assert "run `unimem-bench run` or `unimem-bench sweep` first" in out
    assert "no sweep named 'nope'" in one_line_error(capsys, ["plot", "--out", str(sweep_results_dir), "--sweep",
                                                              "nope"])


def test_plot_writes_png_and_svg_for_the_table_and_every_sweep(sweep_results_dir, tmp_path):
    assert cli.main(["plot", "--out", str(sweep_results_dir), "--plots-dir", str(tmp_path)]) == 0
    sweeps = [p.stem for p in (sweep_results_dir / "sweeps").glob("*.yaml")]
    stems = {"dots_token_ppl", *(f"sweep_{s}" for s in sweeps)}
    assert {p.name for p in tmp_path.iterdir()} == {f"{s}.{ext}" for s in stems for ext in ("png", "svg")}
    for stem in stems:
        image = matplotlib.image.imread(tmp_path / f"{stem}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05
        assert "token perplexity" in (tmp_path / f"{stem}.svg").read_text()


def test_plot_draws_needle_heatmaps_and_length_curves_from_breakdown_rows(tmp_path):
    """Rows in the runner's shape: summary rows (the headline among them) and breakdowns (NIAH depths; pi-length
    per length, the longest being the summary)."""
    rows, lengths = [], (512, 1024, 2048)
    for method in ("vanilla", "position_interpolation"):
        niah = {"run_id": f"{method}--niah--1", "model": "hf:/m/stories260K", "method": method, "task": "niah", "n": 4,
                "higher_is_better": True, "finished": "2026-01-01T00:00:00+00:00", "schema": 2}
        rows.append({**niah, "subtask": "", "context_len": 2048, "metric": "accuracy", "value": 0.5, "summary": True,
                     "headline": True})
        rows += [{**niah, "subtask": f"depth={d}", "context_len": n, "metric": "accuracy", "value": d,
                  "summary": False, "headline": False} for d in (0.0, 0.5, 1.0) for n in lengths]
        pi = {"run_id": f"{method}--pi-length--1", "model": "hf:/m/stories260K", "method": method,
              "task": "pi-length", "subtask": "", "n": 9, "higher_is_better": False,
              "finished": "2026-01-01T00:00:00+00:00", "schema": 2}
        for metric in ("token_ppl", "tail_token_ppl"):
            rows += [{**pi, "context_len": n, "metric": metric, "value": 10.0 + i, "summary": n == 2048,
                      "headline": n == 2048 and metric == "token_ppl"} for i, n in enumerate(lengths[::-1])]
    pd.DataFrame(rows, columns=records.LEADERBOARD_COLUMNS).to_csv(tmp_path / "leaderboard.csv", index=False)
    assert cli.main(["plot", "--out", str(tmp_path)]) == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    stems = {"bars_accuracy", "niah_vanilla", "niah_position_interpolation", "niah_methods",
             "pi_length_token_ppl_stories260K", "pi_length_tail_token_ppl_stories260K"}
    assert names == {f"{s}.{ext}" for s in stems for ext in ("png", "svg")}
    for stem in stems:
        assert matplotlib.image.imread(tmp_path / "plots" / f"{stem}.png").shape[1] > 400
        assert (tmp_path / "plots" / f"{stem}.svg").read_text().count("<svg") == 1


def execute(notebook: Path, results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a notebook top to bottom in a kernel of this interpreter; returns its printed output."""
    spec = tmp_path / "jupyter" / "kernels" / "unimem-bench-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("UNIMEM_RESULTS", str(results))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, kernel_name="unimem-bench-test", timeout=300,
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 1, "the notebook drew no figure"
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream")


def test_layer_placement_notebook_reports_the_best_layer_and_gap(sweep_results_dir, tmp_path, monkeypatch):
    text = execute(NOTEBOOKS / "layer_placement.ipynb", sweep_results_dir, tmp_path, monkeypatch)
    found = re.search(r"unimix / github: best single layer (\d+) \(token_ppl ([\d.e+-]+)\); all layers "
                      r"([\d.e+-]+); gap ([\d.e+-]+)", text)
    assert found, text
    _, frame = sweep_frame(sweep_results_dir, "layer-placement")
    singles = frame[frame["injection.layers"] != "all"].astype({"injection.layers": int})
    best = singles.loc[singles["value"].idxmin()]
    all_layers = frame.loc[frame["injection.layers"] == "all", "value"].item()
    assert int(found[1]) == best["injection.layers"]
    assert float(found[2]) == pytest.approx(best["value"], rel=1e-5)
    assert float(found[3]) == pytest.approx(all_layers, rel=1e-5)
    assert float(found[4]) == pytest.approx(best["value"] - all_layers, rel=1e-4, abs=1e-6)
    assert "Pareto-optimal placements" in text


def test_memory_reading_notebook_reports_the_best_topk_and_window(sweep_results_dir, tmp_path, monkeypatch):
    text = execute(NOTEBOOKS / "memory_reading.ipynb", sweep_results_dir, tmp_path, monkeypatch)
    for field, prefix in (("reading.topk", "topk"), ("reading.window", "window")):
        found = re.search(rf"{re.escape(field)} / unimix / github: best (\d+) \(token_ppl ([\d.e+-]+)\)", text)
        assert found, text
        _, frame = sweep_frame(sweep_results_dir, prefix)
        best = frame.loc[frame["value"].idxmin()]
        assert int(found[1]) == int(best[field]) and float(found[2]) == pytest.approx(best["value"], rel=1e-5)
