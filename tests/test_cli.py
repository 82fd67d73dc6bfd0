"""The CLI end to end on stories260K: commands, --config, stdout/stderr, resume (bad input: test_bad_input.py)."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import interrupt_task_run

from unimem_bench.harness.cli import app as cli
from unimem_bench.tasks import TASKS


def test_list_prints_methods_and_tasks(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("transformer_xl", "memorizing_transformer", "20,480 tok, fifo", "top-32", "github", "pg19"):
        assert name in out


def test_list_csv_gives_every_method_its_dimensions_training_and_fidelity(capsys):
    import io

    from unimem_bench.methods import METHODS
    from unimem_bench.methods.registry import FIDELITY_KINDS

    assert cli.main(["list", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype=str)
    assert list(table.columns) == ["method", "management", "writing", "reading", "injection", "training", "fidelity",
                                   "paper"]
    assert list(table["method"]) == METHODS.names()
    assert all(f.startswith(FIDELITY_KINDS) for f in table["fidelity"])
    assert all("arxiv.org" in p for p in table["paper"])
    row = table.set_index("method").loc["streaming_llm"]
    assert (row["management"], row["writing"], row["injection"]) == ("2,048 tok, fifo", "direct", "all")
    assert "global 4 (document)" in row["reading"] and "window" in row["reading"]


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`unimem-bench list | head`: stdout's reader is gone before the listing is written (closed here before the
    child starts writing); the command ends quietly with status 0."""
    import subprocess
    import sys

    code = "import sys; from unimem_bench.harness.cli.app import main; sys.exit(main(['list', '--format', 'csv']))"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_a_method_needs_a_fidelity_line_of_a_known_kind():
    from unimem_bench.methods.registry import method

    with pytest.raises(ValueError, match="must start with one of"):
        method("not_registered", paper="-", url="-", fidelity="faithful")


def test_every_command_module_registers_its_command_and_handler():
    parser = cli.build_parser()
    names = [module.NAME for module in cli.command_modules()]
    assert names[:3] == ["list", "run", "sweep"] and len(set(names)) == len(cli.COMMANDS)
    for module in cli.command_modules():
        assert parser.command_parser(module.NAME).get_default("func") is module.execute


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"unimem-bench {version('unimem-bench')}"


def test_config_file_holds_run_flags_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"methods": ["vanilla", "rmt"], "max-docs": 8, "segment_len": 64,
                                      "set": ["reading.window=8"], "data-dir": "books", "out": str(tmp_path)}))
    args = cli.parse(cli.build_parser(), ["run", "--config", str(config), "--max-docs", "2", "--set", "reading.topk=4"])
    assert (args.methods, args.max_docs, args.segment_len, args.data_dir) == ("vanilla,rmt", 2, 64, Path("books"))
    assert args.overrides == ["reading.window=8", "reading.topk=4"]  # repeatable flags add to the file's
    assert args.tasks == "github"  # neither in the file nor given: the flag's default


def run_args(stories_dir, books_dir, out, methods="vanilla,transformer_xl") -> list[str]:
    return ["run", "--model", str(stories_dir), "--methods", methods, "--tasks", "pg19", "--data-dir",
            str(books_dir), "--max-docs", "2", "--max-tokens", "300", "--segment-len", "64", "--out", str(out)]


def test_run_writes_records_leaderboard_and_plot_then_resumes(stories_dir, books_dir, tmp_path, capsys):
    assert cli.main(run_args(stories_dir, books_dir, tmp_path)) == 0
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert set(board["method"]) == {"vanilla", "transformer_xl"}
    assert set(board["metric"]) >= {"token_ppl", "bits_per_byte", "word_ppl"}
    assert (tmp_path / "plots" / "token_ppl.png").stat().st_size > 10_000
    for run_id in set(board["run_id"]):
        folder = tmp_path / "runs" / run_id
        record = json.loads((folder / "run.json").read_text())
        assert {"commit", "seed", "device", "model", "packages"} <= set(record)
        assert (folder / "config.yaml").read_text().startswith("name:")
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert sum(s["tokens"] for s in samples) == board[board["run_id"] == run_id]["n"].iloc[0]
        assert metrics["token_ppl"] == pytest.approx(
            board[(board["run_id"] == run_id) & (board["metric"] == "token_ppl")]["value"].iloc[0])
    capsys.readouterr()
    assert cli.main(run_args(stories_dir, books_dir, tmp_path)) == 0
    captured = capsys.readouterr()
    assert "2 of 2 results already" in captured.err and "2 of 2" not in captured.out
    assert "Results" in captured.out and "leaderboard:" in captured.out and "Results" not in captured.err
    assert cli.main([*run_args(stories_dir, books_dir, tmp_path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "Results" in captured.out


def test_interrupt_keeps_finished_results_and_rerun_skips_them(stories_dir, books_dir, tmp_path, monkeypatch,
                                                               capsys):
    task = TASKS.get("pg19")
    real_run = type(task).run
    interrupt_task_run(monkeypatch, task, on_call=2)
    assert cli.main(run_args(stories_dir, books_dir, tmp_path)) == 130
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert set(board["method"]) == {"vanilla"}
    first = next((tmp_path / "runs").iterdir())
    stamp = (first / "metrics.json").stat().st_mtime_ns
    monkeypatch.setattr(type(task), "run", real_run)
    capsys.readouterr()
    assert cli.main(run_args(stories_dir, books_dir, tmp_path)) == 0
    assert "1 of 2 results already" in capsys.readouterr().err
    assert (first / "metrics.json").stat().st_mtime_ns == stamp
    assert set(pd.read_csv(tmp_path / "leaderboard.csv")["method"]) == {"vanilla", "transformer_xl"}
