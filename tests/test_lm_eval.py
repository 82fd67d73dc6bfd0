"""lm-eval integration: the `unimem` model against lm-eval's own `hf` model and transformers, on stories260K."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval._cli.utils import key_val_to_dict
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import simple_parse_args_string

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.evaluation import lm_eval_model
from unimem_bench.harness.evaluation.lm_eval_model import UnimemArgs, UnimemLM, plan_model
from unimem_bench.methods import ConfigError
from unimem_bench.methods.registry import UnknownNameError

STORY_PROMPTS = ["Once upon a time", "Lily and Tom", "The little dog", "One day, a girl named Sue",
                 "Tim had a red ball"]
TASKS = ["unimem_offline_rolling", "unimem_offline_mc", "unimem_offline_gen"]


def excerpt(books_dir: Path, chars: int) -> str:
    """A stretch of prose from the middle of a book (past the Gutenberg header)."""
    text = (books_dir / "Emma_158.txt").read_text(encoding="utf-8")
    return text[20000:20000 + chars]


def request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def hf(stories_dir) -> HFLM:
    return HFLM(pretrained=str(stories_dir), device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def vanilla(stories_dir) -> UnimemLM:
    return UnimemLM(pretrained=str(stories_dir), method="vanilla", batch_size=4)


def test_rolling_loglikelihood_equals_lm_eval_hf(stories_dir, books_dir, hf, vanilla):
    """Several 512-token windows and a partial last one (which lm-eval fills with earlier text). In float64 both
    sides agree to ~1e-6 nats (our per-token NLLs pass through float32); in float32, lm-eval's hf sums each window
    in float32, which alone rounds by ~1e-4 nats on 3,000+ tokens, so there the bound is relative."""
    text = excerpt(books_dir, 4000)
    tokens = vanilla.tok_encode(text)
    assert len(tokens) > 3 * 512 and len(tokens) % 512, len(tokens)
    assert len(vanilla.rolling_windows(tokens)) == math.ceil(len(tokens) / 512)
    req = [request("loglikelihood_rolling", text)]
    hf64 = HFLM(pretrained=str(stories_dir), device="cpu", batch_size=4, dtype="float64")
    ours64 = UnimemLM(pretrained=str(stories_dir), method="vanilla", batch_size=4, dtype="float64")
    expected, got = hf64.loglikelihood_rolling(req, disable_tqdm=True)[0], ours64.loglikelihood_rolling(req)[0]
    print(f"float64: hf {expected:.6f} unimem {got:.6f} diff {abs(expected - got):.2e} nats")
    assert abs(expected - got) < 1e-4
    expected, got = hf.loglikelihood_rolling(req, disable_tqdm=True)[0], vanilla.loglikelihood_rolling(req)[0]
    print(f"float32: hf {expected:.6f} unimem {got:.6f} diff {abs(expected - got):.2e} nats")
    assert got == pytest.approx(expected, rel=1e-7)
    xl = UnimemLM(pretrained=str(stories_dir), method="transformer_xl", batch_size=4)
    assert xl.loglikelihood_rolling(req)[0] > got  # memory carries context across segments: the book scores better


def test_loglikelihood_equals_lm_eval_hf(books_dir, hf, vanilla):
    """Short pairs, an empty context, a context beyond max_length (cut from the left as hf does)."""
    pairs = [("Once upon a time, there was a little", " girl"), ("Once upon a time, there was a little", " dog"),
             ("", "Tom went to the park."), ("Lily saw a bird. ", "It was blue."),
             (excerpt(books_dir, 3000), " the house")]
    reqs = [request("loglikelihood", c, x) for c, x in pairs]
    expected, got = hf.loglikelihood(reqs, disable_tqdm=True), vanilla.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], abs=1e-4)


def test_greedy_generation_equals_transformers_generate(hf, vanilla):
    """Token for token: MemoryLM.generate (vanilla) and transformers' generate on 5 story prompts; the adapter's
    generate_until returns their decoded text, and with a stop string the text lm-eval's hf model returns."""
    budget = 20
    model = hf.model  # the unhooked transformers model (the adapter's copy has the UniMem attention installed)
    expected = []
    for prompt in STORY_PROMPTS:
        ids = vanilla.tok_encode(prompt)
        ours = vanilla.lm.generate(torch.tensor(ids), max_new_tokens=budget, eos_token_id=vanilla.stop_ids)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=budget, do_sample=False,
                                 pad_token_id=vanilla.eot_token_id)
        assert ours == out[0, len(ids):].tolist(), prompt
        expected.append(vanilla.tok_decode(ours))
    plain = [request("generate_until", p, {"until": [], "max_gen_toks": budget, "do_sample": False})
             for p in STORY_PROMPTS]
    assert vanilla.generate_until(plain, disable_tqdm=True) == expected
    stopped = [request("generate_until", p, {"until": ["."], "max_gen_toks": budget}) for p in STORY_PROMPTS]
    cut = vanilla.generate_until(stopped, disable_tqdm=True)
    assert cut == hf.generate_until(stopped, disable_tqdm=True)
    assert cut == [text.split(".")[0] for text in expected] and cut != expected  # the stop string mattered


def test_generation_reads_prompt_and_budget_at_once_without_memory(stories_dir, hf):
    """Vanilla with 8-token segments but max_length 512 generates as lm-eval's hf does: the whole (cut) prompt and
    its budget are read at once, as in every task."""
    short = UnimemLM(pretrained=str(stories_dir), method="vanilla", segment_len=8, max_length=512)
    stopped = [request("generate_until", p, {"until": ["."], "max_gen_toks": 20}) for p in STORY_PROMPTS]
    assert short.generate_until(stopped, disable_tqdm=True) == hf.generate_until(stopped, disable_tqdm=True)


def test_sampling_is_seeded_per_request(vanilla):
    kwargs = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.5}
    reqs = [request("generate_until", "Once upon a time", kwargs) for _ in range(2)]
    first, again = vanilla.generate_until(reqs, disable_tqdm=True), vanilla.generate_until(reqs, disable_tqdm=True)
    assert first == again
    assert first[0] != first[1]  # repeats of one prompt draw with seed + request index
    with pytest.raises(ValueError, match="'num_beams' is not supported"):
        vanilla.generate_until([request("generate_until", "Hi", {"num_beams": 2})], disable_tqdm=True)


@pytest.mark.parametrize("parse", [key_val_to_dict, simple_parse_args_string])
def test_model_args_survive_lm_eval_parsing(stories_dir, parse):
    """Both lm-eval parsers (CLI `--model_args`, the Python string form) keep `set=` overrides whole."""
    args = UnimemArgs.from_model_args(parse(f"pretrained={stories_dir},method=transformer_xl,segment_len=64,"
                                            "set=reading.window=32;management.size=48,batch_size=3"))
    assert args.overrides == ("reading.window=32", "management.size=48") and args.batch_size == 3
    plan = plan_model(args)
    assert (plan.segment_len, plan.config.reading.window, plan.config.management.size) == (64, 32, 48)
    quoted = key_val_to_dict(f'pretrained={stories_dir},method=unimix,set="injection.layers=0,2;reading.topk=4"')
    assert plan_model(UnimemArgs.from_model_args(quoted)).config.injection.layers == (0, 2)


def test_default_segment_and_max_length(stories_dir):
    """Without memory: the trained context (512) and max_length = what the method reads; memory methods: half of
    it and no max_length (they stream everything)."""
    def plan(method):
        p = plan_model(UnimemArgs(pretrained=str(stories_dir), method=method))
        return p.segment_len, p.max_length

    assert plan("vanilla") == (512, 512)
    assert plan("position_interpolation") == (512, 2048)
    assert plan("transformer_xl") == (256, None)
    assert plan("rmt") == (256, None)


@pytest.mark.parametrize(("args", "error", "message"), [
    ({"segmentlen": 64}, ConfigError, "unknown 'segmentlen'"),
    ({"method": "transformer-xl"}, UnknownNameError, "did you mean 'transformer_xl'"),
    ({"set": "reading.topk=8"}, ConfigError, "needs memory to search"),
    ({"batch_size": "auto"}, ConfigError, "no automatic batch size"),
    ({"max_length": 64, "max_gen_toks": 64}, ConfigError, "leaves no prompt"),
    ({"pretrained": "./no/such/model"}, ValueError, "no such file or folder"),
])
def test_bad_model_args_fail_before_weights(stories_dir, monkeypatch, args, error, message):
    def forbidden(*a, **k):
        raise AssertionError("weights were loaded before the model args were checked")

    monkeypatch.setattr(lm_eval_model, "load_model", forbidden)
    with pytest.raises(error, match=message):
        UnimemLM(**{"pretrained": str(stories_dir), **args})


def write_offline_tasks(root: Path, books_dir: Path) -> Path:
    """Three lm-eval tasks on local JSON files (no hub): loglikelihood_rolling, multiple_choice, generate_until.

    The rolling documents are 4,000 characters (about 2,240 tokens, four 512-token windows), long enough for
    Transformer-XL's memory to beat vanilla's windows on stories260K (Emma: -8,772 against -8,803 nats on the
    first). On 2,500 characters (1,400 tokens) it did not (-5,515 against -5,511): there lm-eval fills vanilla's
    short last window with earlier text, so vanilla loses little context to begin with."""
    data = {
        "rolling": [{"text": excerpt(books_dir, 8000)[i * 4000:(i + 1) * 4000]} for i in range(2)],
        "mc": [{"question": "Lily went to the park. She played on the", "choices": ["swing", "moon", "spoon"],
                "label": 0},
               {"question": "Tom was hungry, so he ate an", "choices": ["apple", "car", "cloud"], "label": 0},
               {"question": "The sun was hot. Sue wanted to drink some", "choices": ["water", "rocks", "shoes"],
                "label": 0}],
        "gen": [{"prompt": "Once upon a time, there was a little", "answer": "girl"},
                {"prompt": "One day, Tom went to the", "answer": "park"}],
    }
    specific = {
        "rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                    "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
        "mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
               "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
        "gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": " {{answer}}",
                "generation_kwargs": {"until": [".", ","], "max_gen_toks": 16, "do_sample": False},
                "metric_list": [{"metric": "exact_match"}]},
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config = {"task": f"unimem_offline_{name}", "dataset_path": "json", "test_split": "train",
                  "dataset_kwargs": {"data_files": str(path), "cache_dir": str(root / "cache")},
                  "metadata": {"version": 1.0}, **specific[name]}
        (root / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return root


@pytest.fixture(scope="module")
def offline_tasks(tmp_path_factory, books_dir) -> Path:
    return write_offline_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), books_dir)


def metrics(results: dict) -> dict[str, float]:
    return {f"{task}/{key.split(',')[0]}": value for task, row in results["results"].items()
            for key, value in row.items() if key.endswith(",none") and "stderr" not in key}


def test_simple_evaluate_with_a_unimem_object_equals_hf(stories_dir, offline_tasks, vanilla):
    """Python use: `simple_evaluate(model=UnimemLM(...))`; lm-eval's `hf` (by name, after our registration) gives
    the same metrics on the three offline tasks."""
    def run(model, **kwargs):
        manager = TaskManager(include_path=str(offline_tasks), include_defaults=False)
        return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=manager, **kwargs)

    ours = run(vanilla)
    theirs = run("hf", model_args={"pretrained": str(stories_dir)}, device="cpu")
    assert ours["config"]["method"] == "vanilla" and ours["config"]["segment_len"] == 512
    assert set(metrics(ours)) == set(metrics(theirs)) and len(metrics(ours)) == 4
    assert metrics(ours) == pytest.approx(metrics(theirs), rel=1e-5)


@pytest.mark.slow
def test_registering_keeps_lm_eval_models():
    """lm-eval fills its registry lazily only while it is empty: importing our module must not hide `hf` (a fresh
    process, since the registry is per process: ~5 s of imports, so in the slow tier)."""
    code = ("import unimem_bench.harness.evaluation.lm_eval_model\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('unimem').__name__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["UnimemLM", "HFLM"]


def cli_run(argv: list[str], out: Path) -> dict[str, float]:
    """`unimem-bench lm-eval ARGV --output_path OUT` in a fresh process; the metrics of its results file."""
    cmd = [sys.executable, "-m", "unimem_bench.harness.cli", "lm-eval", *argv, "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    return metrics(json.loads(results.read_text(encoding="utf-8")))


@pytest.mark.slow
def test_cli_pass_through_runs_unimem_and_hf(stories_dir, offline_tasks, tmp_path):
    """`unimem-bench lm-eval` end to end, offline: transformer_xl on all three request types, and `--model hf`
    through the same pass-through matching `--model unimem` with vanilla (lm-eval indexes its ~15k built-in tasks
    on every CLI run: ~20 s of CPU each, so this is in the slow tier)."""
    common = ["--tasks", ",".join(TASKS), "--include_path", str(offline_tasks), "--device", "cpu"]
    xl = cli_run(["--model", "unimem", "--model_args", f"pretrained={stories_dir},method=transformer_xl", *common],
                 tmp_path / "xl")
    assert len(xl) == 4 and all(math.isfinite(v) for v in xl.values())
    hf = cli_run(["--model", "hf", "--model_args", f"pretrained={stories_dir}", *common], tmp_path / "hf")
    ours = cli_run(["--model", "unimem", "--model_args", f"pretrained={stories_dir},method=vanilla", *common],
                   tmp_path / "vanilla")
    assert ours == pytest.approx(hf, rel=1e-5)
    key = "unimem_offline_rolling/bits_per_byte"
    assert xl[key] < ours[key]
    bad = [sys.executable, "-m", "unimem_bench.harness.cli", "lm-eval", "--model", "unimem", "--model_args",
           f"pretrained={stories_dir},method=transformer-xl", *common]
    done = subprocess.run(bad, capture_output=True, text=True)
    assert done.returncode == 2 and "did you mean 'transformer_xl'" in done.stderr, done.stderr[-2000:]


def test_lm_eval_subcommand_is_lm_eval_cli(capsys):
    """`unimem-bench lm-eval ARGS` hands ARGS to lm-eval's own parser verbatim, dashes and all."""
    assert "lm-eval" in cli.build_parser().format_help()
    assert cli.main(["lm-eval", "--help"]) == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out
    assert cli.main(["lm-eval", "run", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
