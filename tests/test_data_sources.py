"""Hub data checked in planning, before any weights load: the repository's file list from a local hub endpoint (the
real huggingface_hub client against a small HTTP server standing in for huggingface.co), offline mode against the
datasets cache, and one-line CLI errors for every task that reads the hub."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import one_line_error

from unimem_bench.tasks import TASKS, DataNotFoundError
from unimem_bench.tasks.data.hub import check_hub_dataset

REPOS = {
    # deepmind/pg19 and RedPajama's sample are loaded by a script, which datasets >= 4 refuses to run.
    "deepmind/pg19": ["pg19.py", "README.md", ".gitattributes"],
    "togethercomputer/RedPajama-Data-1T-Sample": ["RedPajama-Data-1T-Sample.py", "README.md"],
    "emozilla/pg19": ["README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00023.parquet"],
    "codeparrot/codeparrot-clean-valid": ["README.md", "data/train-00000-of-00001.parquet"],
    "Xnhyacinth/LongBench": ["README.md", "qasper/test-00000-of-00001.parquet", "trec/test-00000-of-00001.parquet"],
}


class FakeHubHandler(BaseHTTPRequestHandler):
    """Answers the hub's dataset-info request with a repository's file list; 404 for an unknown repository."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        repo = self.path.split("?")[0].removeprefix("/api/datasets/").split("/revision/")[0]
        if repo not in REPOS:
            self.send_error(404, "Repository not found")
            return
        body = json.dumps({"id": repo, "siblings": [{"rfilename": f} for f in REPOS[repo]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(monkeypatch) -> Iterator[str]:
    """A local hub endpoint serving `REPOS`."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    yield endpoint
    server.shutdown()
    server.server_close()


def test_script_based_repositories_fail_in_one_line_naming_the_fix(hub):
    for repo in ("deepmind/pg19", "togethercomputer/RedPajama-Data-1T-Sample"):
        with pytest.raises(DataNotFoundError) as err:
            check_hub_dataset(repo, task="pg19", local=".txt books")
        message = str(err.value)
        assert "script-based" in message and repo in message and "pg19.dataset=" in message
        assert "--data-dir" in message and "\n" not in message


def test_parquet_repositories_pass_and_data_files_must_match_a_file(hub):
    check_hub_dataset("emozilla/pg19", task="pg19", local=".txt books")
    check_hub_dataset("codeparrot/codeparrot-clean-valid", task="github", local="source files",
                      data_files="data/*.parquet")
    with pytest.raises(DataNotFoundError, match=r"no file matching data_files='github_sample.jsonl' \(2 files\)"):
        check_hub_dataset("codeparrot/codeparrot-clean-valid", task="github", local="source files",
                          data_files="github_sample.jsonl")
    with pytest.raises(DataNotFoundError, match="'nobody/nothing' is not reachable"):
        check_hub_dataset("nobody/nothing", task="github", local="source files")


def test_hub_defaults_are_parquet_repositories(hub):
    """The tasks' hub defaults are the parquet repositories above, not the script-based originals."""
    for name in ("pg19", "longbench", "longbench-e"):
        check_hub_dataset(TASKS.get(name).dataset, task=name, local="data")


def test_offline_mode_asks_the_datasets_cache(monkeypatch, tmp_path):
    from datasets import config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(DataNotFoundError, match="offline .* 'emozilla/pg19' is not in the datasets cache"):
        check_hub_dataset("emozilla/pg19", task="pg19", local=".txt books")
    (tmp_path / "emozilla___pg19" / "default" / "0.0.0" / "c0ffee").mkdir(parents=True)  # datasets' cache layout
    check_hub_dataset("emozilla/pg19", task="pg19", local=".txt books")


@pytest.mark.parametrize("tasks", ["pg19", "longbench"])
@pytest.mark.parametrize("offline", [False, True])
def test_cli_without_data_fails_in_one_line_before_weights(capsys, monkeypatch, tmp_path, stories_dir, no_model_work,
                                                           tasks, offline):
    """No --data-dir, no network (conftest's closed port) or offline mode with an empty cache: one line, exit 2."""
    from datasets import config

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "cache")
    out = one_line_error(capsys, ["run", "--model", str(stories_dir), "--methods", "vanilla", "--tasks", tasks,
                                  "--out", str(tmp_path / "out")])
    assert TASKS.get(tasks).dataset in out and "--data-dir" in out
    assert ("datasets cache" if offline else "not reachable") in out


def test_cli_script_based_dataset_fails_before_weights(capsys, tmp_path, stories_dir, hub, no_model_work):
    out = one_line_error(capsys, ["run", "--model", str(stories_dir), "--tasks", "pg19", "--task-arg",
                                  "dataset=deepmind/pg19", "--out", str(tmp_path)])
    assert "script-based (pg19.py)" in out
