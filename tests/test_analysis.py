"""Leaderboard tables, figures and the analysis notebooks, on results the tests make with the tiny model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib.image
import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from unimem_bench.harness import cli, records
from unimem_bench.harness import leaderboard as lb
from unimem_bench.harness.plots import draw_length_curves, draw_niah_heatmap, save_figure
from unimem_bench.methods.config import parse_layers

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def sweep_frame(out: Path, prefix: str, metric: str = "token_ppl") -> tuple[dict, pd.DataFrame]:
    """A saved sweep and its points joined with their leaderboard rows, computed here from the raw files."""
    definition = yaml.safe_load(next((out / "sweeps").glob(f"{prefix}-*.yaml")).read_text())
    points = pd.read_csv(out / "sweeps" / f"{definition['name']}.csv", dtype=str, keep_default_na=False)
    board = pd.read_csv(out / "leaderboard.csv", keep_default_na=False)
    board = board[board["metric"] == metric][["run_id", "value"]]
    return definition, points.merge(board, on="run_id")


def test_leaderboard_marks_the_best_of_each_column(sweep_results_dir, capsys):
    md, csv = sweep_results_dir / "board.md", sweep_results_dir / "board.csv"
    assert cli.main(["leaderboard", "--out", str(sweep_results_dir), "--markdown", str(md), "--csv", str(csv)]) == 0
    board = pd.read_csv(sweep_results_dir / "leaderboard.csv", keep_default_na=False)
    ppl = board[board["metric"] == "token_ppl"]
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
    frame = lb.load(sweep_results_dir, run_ids=list(points["run_id"]))
    settings = frame.drop_duplicates("run_id").set_index("run_id")["setting"]
    for _, point in points.iterrows():
        layers = point["injection.layers"]
        assert settings[point["run_id"]] == f"injection.layers={layers}"
        config = records.read_run_config(sweep_results_dir, point["run_id"])
        assert config["injection"]["layers"] == ("all" if layers == "all" else list(parse_layers(layers)))


def test_leaderboard_filters_fail_in_one_line(sweep_results_dir, capsys):
    assert cli.main(["leaderboard", "--out", str(sweep_results_dir), "--tasks", "pg19"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error:") and "no rows with task ['pg19'] (it has: github)" in out and "\n" not in out
    assert cli.main(["leaderboard", "--out", str(sweep_results_dir / "nowhere")]) == 2
    assert "run `unimem-bench run` or `unimem-bench sweep` first" in capsys.readouterr().out
    assert cli.main(["plot", "--out", str(sweep_results_dir), "--sweep", "nope"]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().out


def test_plot_writes_png_and_svg_for_the_table_and_every_sweep(sweep_results_dir, tmp_path):
    assert cli.main(["plot", "--out", str(sweep_results_dir), "--plots-dir", str(tmp_path)]) == 0
    sweeps = [p.stem for p in (sweep_results_dir / "sweeps").glob("*.yaml")]
    stems = {"bars_token_ppl", *(f"sweep_{s}" for s in sweeps)}
    assert {p.name for p in tmp_path.iterdir()} == {f"{s}.{ext}" for s in stems for ext in ("png", "svg")}
    for stem in stems:
        image = matplotlib.image.imread(tmp_path / f"{stem}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05
        assert "token perplexity" in (tmp_path / f"{stem}.svg").read_text()


def synthetic_board(task: str, rows: list[tuple[str, str, int, float]], metric: str) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": f"{method}--{task}", "model": "m", "method": method, "task": task,
                          "subtask": subtask, "context_len": length, "metric": metric, "value": value, "n": 10}
                         for method, subtask, length, value in rows])


def test_niah_heatmap_shows_accuracy_per_depth_and_length(tmp_path):
    rng = np.random.default_rng(0)
    depths, lengths = (0.0, 0.25, 0.5, 1.0), (1024, 2048, 4096)
    rows = [(m, f"depth={d}", n, float(rng.random())) for m in ("vanilla", "unimix") for d in depths
            for n in lengths]
    frame = synthetic_board("niah", rows, "accuracy").sample(frac=1.0, random_state=1)
    fig = draw_niah_heatmap(frame)
    for ax, method in zip(fig.axes[:2], ("vanilla", "unimix"), strict=True):  # registry order; then the colorbar
        expected = [[next(v for m, s, n, v in rows if m == method and s == f"depth={d}" and n == length)
                     for length in lengths] for d in depths]
        np.testing.assert_allclose(ax.images[0].get_array(), expected)
        assert ax.get_title() == method
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1,024", "2,048", "4,096"]
    assert save_figure(fig, tmp_path / "niah")[0].stat().st_size > 10_000


def test_length_curves_plot_perplexity_against_evaluation_length(tmp_path):
    lengths = (512, 1024, 2048, 4096, 8192)
    rows = [(m, "", n, 10.0 + k * i) for k, m in enumerate(("vanilla", "position_interpolation"))
            for i, n in enumerate(lengths)]
    frame = synthetic_board("pi-length", rows[::-1], "token_ppl")
    fig = draw_length_curves(frame)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["vanilla", "position_interpolation"]  # registry order
    for line, k in zip(ax.lines, (0, 1), strict=True):
        assert list(line.get_xdata()) == list(lengths)
        assert list(line.get_ydata()) == [10.0 + k * i for i in range(len(lengths))]
    assert ax.get_xscale() == "log"
    assert save_figure(fig, tmp_path / "pi")[1].read_text().count("<svg") == 1


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
