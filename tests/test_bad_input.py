"""Every kind of bad input a new user gives fails the same way: exit status 2, nothing on stdout, one `error:` line
on stderr naming the problem, and no model weights loaded. And a non-UTF-8 book is read, not refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_line_error, save_tiny_model, write_text_docs
from transformers import GPT2Config

from unimem_bench.harness.cli import app as cli


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model (2 layers, trained context 256), a gpt2 config, books, and the bad files of the cases."""
    root = tmp_path_factory.mktemp("bad-input")
    paths = {"model": save_tiny_model(root / "tiny"), "books": write_text_docs(root / "books", [400, 400]),
             "root": root}
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(root / "gpt2")
    paths["gpt2"] = root / "gpt2"
    for name, text in {"task_args.yaml": "niah:\n  lengths: [1, 2\n", "recipe.yaml": "tokens: 10\n  lr: 1\n",
                       "unknown_option.yaml": "tokens: 10\nlearning_rate: 1e-4\n",
                       "config_unknown.yaml": "max-doc: 3\n", "config_bad_value.yaml": "segment-len: abc\n",
                       "a_file.txt": "not a folder\n"}.items():
        (root / name).write_text(text)
        paths[name] = root / name
    longbench = root / "longbench"
    longbench.mkdir()
    good = {"input": "q", "context": "c", "answers": ["a"], "length": 1, "all_classes": None, "_id": "0"}
    (longbench / "qasper.jsonl").write_text(json.dumps(good) + "\n" + '{"input": "q", "context": \n')
    paths["longbench"] = longbench
    (root / "llama2c").mkdir()
    (root / "llama2c" / "model.bin").write_bytes(b"\x00" * 12)
    (root / "llama2c" / "tok512.bin").write_bytes(b"\x00" * 12)
    paths["llama2c"] = root / "llama2c" / "model.bin"
    return paths


def run(files: dict[str, Path], *args: str) -> list[str]:
    return ["run", "--model", str(files["model"]), "--out", str(files["root"] / "results"), *args]


def sweep(files: dict[str, Path], *args: str) -> list[str]:
    return ["sweep", "--method", "unimix", "--model", str(files["model"]), "--out", str(files["root"] / "results"),
            *args]


def finetune(files: dict[str, Path], *args: str) -> list[str]:
    return ["finetune", "--method", "transformer_xl", "--model", str(files["model"]), "--tokens", "64", "--out",
            str(files["root"] / "ft"), "--data", str(files["books"]), *args]


# (id, argv builder, what the error line names)
CASES = [
    ("unknown-method", lambda f: run(f, "--methods", "transfomer_xl"), "did you mean 'transformer_xl'"),
    ("unknown-task", lambda f: run(f, "--tasks", "pg-19"), "did you mean 'pg19'"),
    ("unknown-command", lambda f: ["evaluate"], "invalid choice: 'evaluate'"),
    ("unknown-flag", lambda f: run(f, "--documents", "3"), "unrecognized arguments: --documents 3"),
    ("unknown-preset", lambda f: sweep(f, "--preset", "nope"), "invalid choice: 'nope'"),
    ("unknown-config-field", lambda f: run(f, "--set", "reading.topkk=8"), "reading has no field 'topkk'"),
    ("unknown-config-section", lambda f: run(f, "--set", "readings.topk=8"), "unknown section 'readings'"),
    ("malformed-set", lambda f: run(f, "--set", "topk=8"), "must look like section.field=value"),
    ("set-value-of-wrong-type", lambda f: run(f, "--set", "reading.window=abc"), "reading.window takes an integer"),
    ("no-memory-to-search", lambda f: run(f, "--methods", "memorizing_transformer", "--set", "management.size=0"),
     "needs memory to search"),
    ("window-over-memory", lambda f: run(f, "--methods", "transformer_xl", "--set", "reading.window=100000"),
     "larger than management.size"),
    ("layer-the-model-lacks", lambda f: run(f, "--methods", "unimix", "--set", "injection.layers=9"),
     "names layer 9 but the model has 2 layers"),
    ("missing-model", lambda f: run(f, "--model", "./no/such/model"), "no such file or folder"),
    ("model-engine-cannot-hook", lambda f: run(f, "--model", str(f["gpt2"])), "'gpt2' cannot be hooked"),
    ("broken-llama2c-file", lambda f: run(f, "--model", str(f["llama2c"])), "model.bin"),
    ("missing-data-dir", lambda f: run(f, "--tasks", "pg19", "--data-dir", "/nonexistent/books"), "/nonexistent/books"),
    ("no-data-offline", lambda f: run(f, "--tasks", "pg19"), "--data-dir"),
    ("unknown-task-arg", lambda f: run(f, "--task-arg", "max_char=3"), "unknown task argument 'max_char'"),
    ("task-arg-without-value", lambda f: run(f, "--task-arg", "min_chars"), "expected key=value"),
    ("task-arg-out-of-range", lambda f: run(f, "--tasks", "niah", "--task-arg", "niah.depths=0,2"), "niah.depths"),
    ("query-aware-after-memory-tokens", lambda f: run(f, "--methods", "h2o", "--set", "writing.memory_tokens=2",
                                                      "--tasks", "niah", "--task-arg", "niah.query_mode=query_aware"),
     "query_mode=query_agnostic"),
    ("query-aware-after-memory-tokens-ruler-cwe", lambda f: run(
        f, "--methods", "h2o", "--set", "writing.memory_tokens=2", "--tasks", "ruler_cwe", "--task-arg",
        "query_mode=query_aware"), "query_mode=query_agnostic"),
    ("query-mode-unknown-ruler-vt", lambda f: run(f, "--tasks", "ruler_vt", "--task-arg", "query_mode=aware"),
     "ruler_vt.query_mode='aware': choose one of query_agnostic, query_aware"),
    ("query-mode-unknown-ruler-qa-sweep", lambda f: sweep(
        f, "--vary", "reading.topk=0,4", "--tasks", "ruler_qa_1", "--task-arg", "ruler_qa_1.query_mode=both"),
     "ruler_qa_1.query_mode='both': choose one of query_agnostic, query_aware"),
    ("query-mode-unknown-ruler-group", lambda f: run(f, "--tasks", "ruler", "--task-arg", "ruler.query_mode=on"),
     "ruler.query_mode='on': choose one of query_agnostic, query_aware"),
    ("unparsable-task-args-yaml", lambda f: run(f, "--task-args", str(f["task_args.yaml"])), "is not valid YAML"),
    ("missing-task-args-file", lambda f: run(f, "--task-args", "nope.yaml"), "--task-args nope.yaml: no such file"),
    ("longbench-broken-line", lambda f: run(f, "--tasks", "longbench", "--data-dir", str(f["longbench"]),
                                            "--task-arg", "datasets=qasper"), "qasper.jsonl line 2 is not valid JSON"),
    ("out-is-a-file", lambda f: run(f, "--out", str(f["a_file.txt"])), "is a file: point --out at a folder"),
    ("segment-len-not-a-number", lambda f: run(f, "--segment-len", "abc"), "'abc' is not a whole number"),
    ("segment-len-zero", lambda f: run(f, "--segment-len", "0"), "--segment-len: 0 must be >= 1"),
    ("max-docs-zero", lambda f: run(f, "--max-docs", "0"), "--max-docs/--limit: 0 must be >= 1"),
    ("max-docs-negative", lambda f: run(f, "--max-docs", "-3"), "--max-docs/--limit: -3 must be >= 1"),
    ("not-a-device", lambda f: run(f, "--device", "gpu"), "--device 'gpu' is not a device"),
    ("config-unknown-flag", lambda f: run(f, "--config", str(f["config_unknown.yaml"])),
     "unknown flag 'max-doc'; did you mean 'max-docs'"),
    ("config-bad-value", lambda f: run(f, "--config", str(f["config_bad_value.yaml"])),
     "segment-len: 'abc' is not a whole number"),
    ("malformed-vary", lambda f: sweep(f, "--vary", "reading.topk"), "must look like section.field=v1,v2"),
    ("sweep-without-method", lambda f: ["sweep", "--vary", "reading.topk=0,4"], "sweep needs --method"),
    ("unparsable-recipe", lambda f: finetune(f, "--recipe", str(f["recipe.yaml"])), "line 2 is not valid YAML"),
    ("unknown-recipe-option", lambda f: finetune(f, "--recipe", str(f["unknown_option.yaml"])),
     "unknown option 'learning_rate'"),
    ("finetune-without-tokens", lambda f: ["finetune", "--method", "rmt", "--out", "x"], "finetune needs --tokens"),
    ("finetune-out-is-a-file", lambda f: finetune(f, "--out", str(f["a_file.txt"])), "point --out at a folder"),
]


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_on_stderr_before_model_work(files, capsys, no_model_work, build, message):
    line = one_line_error(capsys, build(files))
    assert message in line, line


def test_unknown_metric_names_the_metrics_there(sweep_results_dir, capsys):
    line = one_line_error(capsys, ["leaderboard", "--out", str(sweep_results_dir), "--metric", "perplexity"])
    assert "no rows with metric 'perplexity'" in line and "token_ppl" in line


def test_a_real_process_writes_only_the_error_line_to_stderr(tmp_path):
    """The command as a user runs it: `... 2>/dev/null` prints nothing, `... >/dev/null` the one line, exit 2."""
    done = subprocess.run([sys.executable, "-m", "unimem_bench.harness.cli", "run", "--methods", "transfomer_xl",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: unknown method 'transfomer_xl'") and done.stderr.count("\n") == 1


def test_the_error_goes_to_stderr_even_under_quiet(files, capsys, no_model_work):
    assert "did you mean" in one_line_error(capsys, ["-q", *run(files, "--methods", "transfomer_xl")])
    assert "did you mean" in one_line_error(capsys, [*run(files, "--methods", "transfomer_xl"), "--quiet"])


def test_a_latin1_book_is_read_by_its_declared_encoding_and_logged(files, tmp_path, capsys, caplog):
    """A Project Gutenberg book in ISO-8859-1 (its header says so) is decoded as such, not refused; the run logs it."""
    books = tmp_path / "books"
    books.mkdir()
    text = ("The Project Gutenberg eBook\nCharacter set encoding: ISO-8859-1\n*** START OF THIS PROJECT GUTENBERG "
            "EBOOK ***\n" + "Le garçon déjà parti à l'école, où il a vu des élèves. " * 20 + "\n*** END OF THIS ***\n")
    (books / "french.txt").write_bytes(text.encode("latin-1"))
    argv = run(files, "--methods", "vanilla", "--tasks", "pg19", "--data-dir", str(books), "--max-tokens", "64",
               "--out", str(tmp_path / "out"))
    with caplog.at_level(logging.INFO, logger="unimem_bench"):
        assert cli.main(argv) == 0
    assert any("french.txt as iso8859-1 (declared in its header" in r.getMessage() for r in caplog.records)
    samples = next((tmp_path / "out" / "runs").glob("*/samples.jsonl")).read_text()
    assert "french.txt" in samples


def test_read_text_decodes_undeclared_cp1252_and_translates_newlines_as_text_mode_does(tmp_path):
    from unimem_bench.tasks.data.files import read_text

    (tmp_path / "a.txt").write_bytes("“Smart quotes”\r\nand café\rend".encode("cp1252"))
    assert read_text(tmp_path / "a.txt") == "“Smart quotes”\nand café\nend"
    (tmp_path / "b.txt").write_bytes(b"Gutenberg line ends\r\nstay\r\n")
    assert read_text(tmp_path / "b.txt") == (tmp_path / "b.txt").read_text(encoding="utf-8")
