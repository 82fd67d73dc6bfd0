"""`unimem-bench report`: the self-contained results page, checked as files and in a real headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.reporting import results as reader

CHROMIUM = os.environ.get("UNIMEM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NO_BROWSER = ("no browser for the page test: install the system Chromium (`apt-get install -y chromium`) and "
              "Playwright (`pip install -e '.[dev]'`); see the README's results page section")
needs_browser = pytest.mark.skipif(CHROMIUM is None or importlib.util.find_spec("playwright") is None,
                                   reason=NO_BROWSER)
METHODS = ("vanilla", "transformer_xl", "memorizing_transformer")


@pytest.fixture(scope="module")
def results(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run on the tiny model: code perplexity with position buckets of 64 tokens, and a 2 x 2 needle grid."""
    out = tmp_path_factory.mktemp("report-results")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only wait for each other on a shared machine
    try:
        assert cli.main(["run", "--model", str(tiny_model_dir), "--methods", ",".join(METHODS), "--tasks",
                         "github,niah", "--max-docs", "2", "--max-tokens", "600", "--segment-len", "32",
                         "--task-arg", "github.first_bucket=64", "--task-arg", "niah.lengths=256,512",
                         "--task-arg", "niah.depths=0,1", "--task-arg", "niah.preset=story",
                         "--task-arg", "niah.max_new_tokens=4", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def page(results: Path) -> Path:
    assert cli.main(["report", "--results", str(results), "--out", str(results / "page" / "index.html")]) == 0
    return results / "page" / "index.html"


def headline_values(results: Path, task: str, metric: str) -> dict[str, float]:
    frame = reader.read_leaderboard(results / "leaderboard.csv")
    rows = frame[(frame["task"] == task) & frame["summary"] & (frame["metric"] == metric)]
    return {m: float(v) for m, v in rows[["method", "value"]].itertuples(index=False)}


def test_page_is_self_contained_and_links_every_number_to_a_run_record(results, page):
    text = page.read_text()
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text), "the page must not load anything remotely"
    assert "<link" not in text and "<script src" not in text
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) >= 4 and all(src.startswith("data:image/svg+xml;base64,") for src in images)
    frame = reader.read_leaderboard(results / "leaderboard.csv")
    linked = set(re.findall(r'data-run="([^"]+)"', text))
    assert linked == set(frame["run_id"])
    for rid in linked:
        assert f'id="run-{rid}"' in text
        assert reader.read_run_json(results, rid)["commit"] in text


def test_position_buckets_are_breakdown_rows_and_a_table_on_the_page(results, page):
    frame = reader.read_leaderboard(results / "leaderboard.csv")
    buckets = frame[(frame["task"] == "github") & frame["subtask"].str.startswith("pos:")]
    assert set(buckets["subtask"]) == {"pos:0-64", "pos:64-128", "pos:128-256", "pos:256-512", "pos:512-1024"}
    assert (buckets["context_len"] == buckets["subtask"].str.split("-").str[1].astype(int)).all()
    # Every document's scored tokens land in exactly one bucket.
    for rid, run in buckets.groupby("run_id"):
        assert not run["summary"].any() and not run["higher_is_better"].any()
        assert run["n"].sum() == frame[(frame["run_id"] == rid) & frame["headline"]]["n"].item()
    text = page.read_text()
    assert "token_ppl by position in the document" in text
    assert (results / "plots" / "github_positions.png").exists()


def test_page_of_sweeps_names_each_setting_and_embeds_every_sweep_figure(sweep_results_dir, tmp_path):
    from unimem_bench.harness.reporting.html import write_report

    text = write_report(sweep_results_dir, tmp_path / "sweeps.html").read_text()
    sweeps = reader.list_sweeps(sweep_results_dir)
    section = text[text.index('id="sweeps"'):text.index('id="runs"')]
    assert section.count("<img ") == len(sweeps) >= 3
    board = reader.read_leaderboard(sweep_results_dir / "leaderboard.csv")
    assert set(re.findall(r'data-run="([^"]+)"', text)) == set(board["run_id"])
    assert '<th class="text" data-type="text">setting' in text and "injection.layers=" in text


def test_the_page_module_imports_neither_torch_nor_the_registries_nor_the_runner():
    code = ("import sys, unimem_bench.harness.reporting.html; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('unimem_bench.methods', "
            "'unimem_bench.tasks', 'unimem_bench.harness.evaluation', 'matplotlib.pyplot'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_position_figure_draws_each_methods_change_relative_to_vanilla_per_bucket(results):
    from unimem_bench.harness.reporting.differences import draw_position_curves, position_table

    frame = reader.read_leaderboard(results / "leaderboard.csv")
    fig = draw_position_curves(position_table(frame, "github"), task="github")
    absolute, relative = fig.axes[:2]
    buckets = frame[(frame["task"] == "github") & frame["subtask"].str.startswith("pos:")]
    per_method = {m: rows.sort_values("context_len") for m, rows in buckets.groupby("method")}
    vanilla = per_method["vanilla"]["value"].to_numpy()
    lines = {line.get_label(): line for line in relative.get_lines()}
    assert set(lines) == set(METHODS)  # vanilla is the dashed zero line
    for method, rows in per_method.items():
        drawn = lines[method].get_ydata()
        expected = [0.0, 0.0] if method == "vanilla" else 100 * (rows["value"].to_numpy() / vanilla - 1)
        assert drawn == pytest.approx(expected)
        if method != "vanilla":
            assert list(lines[method].get_xdata()) == rows["context_len"].tolist()
    assert {line.get_label() for line in absolute.get_lines()} == set(METHODS)
    assert relative.get_xscale() == "log"


def test_report_errors_are_one_line(capsys, tmp_path):
    from helpers import one_line_error

    assert "no leaderboard" in one_line_error(capsys, ["report", "--results", str(tmp_path)])
    (tmp_path / "leaderboard.csv").write_text(",".join(reader.V1_COLUMNS) + "\n")
    assert "is a folder" in one_line_error(capsys, ["report", "--results", str(tmp_path), "--out", str(tmp_path)])


@needs_browser
def test_page_in_headless_chromium_sorts_marks_the_best_and_opens_run_records(results, page):
    from playwright.sync_api import sync_playwright

    ppl = headline_values(results, "github", "token_ppl")
    assert len(set(ppl.values())) == len(METHODS), "the methods must differ for the sort to be checked"
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses its sandbox as root (CI containers).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            view = browser.new_page()
            errors: list[str] = []
            remote: list[str] = []
            view.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            view.on("pageerror", lambda e: errors.append(str(e)))
            view.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            view.goto(page.as_uri())

            table = view.locator("#task-github table.board").first
            assert table.locator("tbody tr").count() == len(METHODS)

            def column() -> list[tuple[str, float]]:
                return table.evaluate("""t => {
                    const i = [...t.tHead.rows[0].cells].findIndex(c => c.textContent.startsWith('token_ppl'));
                    return [...t.tBodies[0].rows].map(r => [r.cells[0].textContent.trim(),
                                                            parseFloat(r.cells[i].dataset.value)]);
                }""")

            shown = column()
            assert dict(shown) == ppl  # the page shows the leaderboard's numbers, exactly
            best = table.locator("td.best").first.evaluate("c => c.parentElement.cells[0].textContent.trim()")
            assert best == min(ppl, key=ppl.get)  # perplexity: lower is better

            header = table.locator("thead th", has_text="token_ppl")
            header.click()
            ascending = column()
            assert header.get_attribute("aria-sort") == "ascending"
            assert [v for _, v in ascending] == sorted(ppl.values()) and dict(ascending) == ppl
            header.click()
            descending = column()
            assert [v for _, v in descending] == sorted(ppl.values(), reverse=True) and dict(descending) == ppl
            assert descending != ascending

            link = table.locator("tbody tr td a[data-run]").first
            rid = link.get_attribute("data-run")
            record = json.loads((results / "runs" / rid / "run.json").read_text())
            dialog = view.locator("#run-dialog")
            assert not dialog.is_visible()
            link.click()
            assert dialog.is_visible()
            content = dialog.inner_text()
            assert rid in content and record["commit"] in content and f"seed\n{record['seed']}" in content
            assert "config.yaml" in content and record["packages"]["torch"] in content
            dialog.locator("button.close").click()
            assert not dialog.is_visible()

            assert view.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 100)")
            assert view.locator("img").count() >= 4
            assert errors == [] and remote == []
        finally:
            browser.close()


def test_breakdown_columns_order_depth_and_named_rows_of_one_metric_by_length():
    """Passkey-style breakdowns mix `depth=<d>` cells and named rows at the same lengths: they sort (length first,
    then depth, then name) instead of comparing a name with nothing."""
    from unimem_bench.harness.reporting.html import breakdown_key

    rows = [("qa2", 512), ("depth=0.5", 512), ("depth=0", 512), ("qa10", 256), ("pos:512-1024", 0), ("", 256)]
    ordered = sorted(rows, key=lambda r: breakdown_key(*r))
    assert ordered == [("pos:512-1024", 0), ("", 256), ("qa10", 256), ("depth=0", 512), ("depth=0.5", 512),
                       ("qa2", 512)]
