"""Needle heatmaps from a leaderboard CSV: the grids read back exactly, the latest run wins, one file per method."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from unimem_bench.harness.evaluation.records import LEADERBOARD_COLUMNS
from unimem_bench.harness.reporting.heatmaps import needle_grids, plot_niah_heatmaps
from unimem_bench.harness.reporting.results import Order

LENGTHS = (256, 512, 1024)
DEPTHS = (0.0, 0.25, 0.5, 1.0)


def value(method: str, length: int, depth: float) -> float:
    """A distinct value per cell, so a transposed or shuffled grid cannot pass."""
    return round((LENGTHS.index(length) * len(DEPTHS) + DEPTHS.index(depth)) / 12 + (method == "rmt") * 0.01, 4)


def board(tmp_path):
    rows = []
    for model in ("stories260K", "other"):
        for method in ("vanilla", "rmt", "transformer_xl"):
            # The newer run is written first: `finished`, not the file's order, says which is newest.
            for run, offset, day in ((f"{method}--niah--new", 0.0, 2), (f"{method}--niah--old", 0.5, 1)):
                base = {"run_id": f"{run}-{model}", "model": model, "method": method, "task": "niah", "n": 1,
                        "finished": f"2026-01-0{day}T00:00:00+00:00", "higher_is_better": True, "schema": 2}
                rows.append({**base, "subtask": "", "context_len": 1024, "metric": "accuracy", "value": 0.5,
                             "summary": True, "headline": True})
                for length in LENGTHS:
                    for depth in DEPTHS:
                        if method == "transformer_xl" and (length, depth) == (1024, 1.0):
                            continue  # a cell this method's grid lacks
                        rows.append({**base, "subtask": f"depth={depth}", "context_len": length, "metric": "accuracy",
                                     "value": min(1.0, value(method, length, depth) + offset), "summary": False,
                                     "headline": False})
    rows.append({"run_id": "vanilla--pg19--x", "model": "stories260K", "method": "vanilla", "task": "pg19",
                 "subtask": "", "context_len": 4096, "metric": "token_ppl", "value": 9.5, "n": 100, "summary": True,
                 "headline": True, "higher_is_better": False, "finished": "2026-01-01T00:00:00+00:00", "schema": 2})
    path = tmp_path / "leaderboard.csv"
    pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS).to_csv(path, index=False)
    return path


def test_grids_read_back_the_latest_run_exactly(tmp_path):
    grids = needle_grids(board(tmp_path), model="stories260K")
    assert list(grids) == [("stories260K", "niah")]
    tables = grids[("stories260K", "niah")]
    assert list(tables) == ["rmt", "transformer_xl", "vanilla"]  # no order given: alphabetical
    in_order = needle_grids(board(tmp_path), model="stories260K", order=Order(methods=("vanilla", "transformer_xl")))
    assert list(in_order[("stories260K", "niah")]) == ["vanilla", "transformer_xl", "rmt"]
    for method, table in tables.items():
        assert list(table.index) == list(DEPTHS) and list(table.columns) == list(LENGTHS)
        for length in LENGTHS:
            for depth in DEPTHS:
                got = table.loc[depth, length]
                if method == "transformer_xl" and (length, depth) == (1024, 1.0):
                    assert np.isnan(got)
                else:
                    assert got == value(method, length, depth)


def test_one_heatmap_per_method_and_one_side_by_side(tmp_path):
    out = tmp_path / "plots"
    paths = plot_niah_heatmaps(board(tmp_path), out, model="stories260K")
    names = sorted(p.name for p in paths)
    assert names == ["niah_methods.png", "niah_rmt.png", "niah_transformer_xl.png", "niah_vanilla.png"]
    sizes = {p.name: Image.open(p).size for p in paths}
    assert sizes["niah_methods.png"][0] > 2 * sizes["niah_vanilla.png"][0]  # three panels side by side
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary files left behind
    both = plot_niah_heatmaps(board(tmp_path), tmp_path / "all")
    assert len(both) == 8 and all(p.name.startswith(("niah_stories260K_", "niah_other_")) for p in both)


def test_no_needle_rows_draw_nothing(tmp_path):
    path = tmp_path / "leaderboard.csv"
    pd.DataFrame([{"run_id": "a", "model": "m", "method": "vanilla", "task": "pg19", "subtask": "",
                   "context_len": 10, "metric": "token_ppl", "value": 3.0, "n": 9}]).to_csv(path, index=False)
    assert plot_niah_heatmaps(path, tmp_path / "plots") == []
