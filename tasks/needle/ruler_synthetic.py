"""RULER's variable tracking (vt), common words extraction (cwe) and frequent words extraction (fwe).

Compared with NVIDIA/RULER at commit c3f5e3b (scripts/data/synthetic/variable_tracking.py,
common_words_extraction.py, freq_words_extraction.py, constants.py; scripts/synthetic.yaml; eval constants): the
templates, answer prefixes, tokens_to_generate (30 / 120 / 50), the yaml's settings (vt: noise haystack, 1 chain of
4 hops; cwe: 30 / 3 repeats of 10 common words, one few-shot example, the short setting 6 / 1 below 4,096 tokens;
fwe: zeta distribution alpha 2, 6-letter coded words, vocabulary length // 50, the top word replaced by '...'), the
answers, and string_match_all. Each length holds `samples` prompts, each as long as fits.

Differences, each for a reason: samples draw from a generator seeded by (seed, task, length, sample) instead of one
process-wide seed, so a resumed or sharded run rebuilds the same prompts; the haystack size is the largest that fits
(bisection) where RULER steps by a fixed increment; vt's in-context example is at most `fewshot_tokens` long (RULER:
500 tokens, here also at most 1/8 of the length, RULER's 500 in its shortest 4K prompt, so short contexts keep room
for the task); cwe's words are the needle words' adjectives and nouns, then adjective-noun pairs, then triples
(RULER samples wonderwords' lists and then a 5-letter English list, which this package does not ship).
`query_mode`: the question a query_aware compression observes is the template after the (last) context: the
question and the answer prefix.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.base import TASKS, AccuracyHeadline, QueryMode, SampleLog, ScoringLM, TaskOptions, TaskResult
from unimem_bench.tasks.needle.haystack import NOISE, check_grid
from unimem_bench.tasks.needle.lengths import (
    Fitter,
    after_context,
    length_result,
    run_lengths,
    sample_rng,
    task_lengths,
)
from unimem_bench.tasks.needle.ruler import ADJECTIVES, NOUNS

Kind = Literal["vt", "cwe", "fwe"]

TEMPLATES: dict[str, tuple[str, str]] = {
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots "
            "'....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
}
"""RULER's (template, answer_prefix) per task (scripts/data/synthetic/constants.py)."""
TOKENS_TO_GENERATE = {"vt": 30, "cwe": 120, "fwe": 50}


def template(kind: str) -> str:
    return TEMPLATES[kind][0] + TEMPLATES[kind][1]


# --- variable tracking ---------------------------------------------------------------------------------------------

def vt_chains(rng: random.Random, num_chains: int, num_hops: int, icl: bool = False) -> tuple[list[list[str]],
                                                                                                list[list[str]]]:
    """RULER's generate_chains: distinct upper-case names (5 letters, 3 in the example), the first assigned a
    5-digit value (12345 in the example), each next one the previous."""
    k = 3 if icl else 5
    names: list[str] = []
    while len(names) < (num_hops + 1) * num_chains:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in names:
            names.append(name)
    groups, chains = [], []
    for i in range(0, len(names), num_hops + 1):
        chain_vars = names[i:i + num_hops + 1]
        groups.append(chain_vars)
        value = "12345" if icl else str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999) excludes 99999
        chains.append([f"VAR {chain_vars[0]} = {value}"]
                      + [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(num_hops)])
    return groups, chains


def vt_text(rng: random.Random, n_noise: int, num_chains: int, num_hops: int, icl: bool = False) -> tuple[str,
                                                                                                             list[str]]:
    """RULER's generate_input_output with the noise haystack: each chain's lines at sorted random positions."""
    groups, chains = vt_chains(rng, num_chains, num_hops, icl)
    value = chains[0][0].split("=")[-1].strip()
    sentences = [NOISE] * n_noise
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, (at, line) in enumerate(zip(positions, chain, strict=True)):
            sentences.insert(at + j, line)
    context = "\n".join(sentences).replace(". \n", ".\n")
    return template("vt").format(context=context, query=value, num_v=num_hops + 1), groups[0]


def randomize_icl(example: str, num_hops: int, rng: random.Random) -> str:
    """RULER's randomize_icl: the example's answer names and its value 12345 replaced by fresh random ones."""
    for item in example.strip().split()[-num_hops - 1:]:
        example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return example.replace("12345", str(rng.randint(10000, 99998)))


# --- common words extraction ---------------------------------------------------------------------------------------

def cwe_words(n: int) -> list[str]:
    """The first n words of the vocabulary: single adjectives and nouns, then pairs, then triples (sorted each)."""
    singles = sorted(set(ADJECTIVES) | set(NOUNS))
    words = list(singles)
    if n > len(words):
        words += sorted(f"{a}-{b}" for a, b in product(ADJECTIVES, NOUNS))
    if n > len(words):
        words += sorted(f"{a}-{b}-{c}" for a, b, c in product(ADJECTIVES, ADJECTIVES, NOUNS))
    if n > len(words):
        raise ValueError(f"cwe needs {n} distinct words; the vocabulary has {len(words)}")
    return words


def cwe_example(rng: random.Random, seed: int, num_words: int, common_repeats: int, uncommon_repeats: int,
                num_cw: int) -> tuple[str, list[str]]:
    """RULER's get_example: num_words distinct words, the first num_cw repeated more often, shuffled with the
    fixed seed (RULER shuffles every list with random.Random(random_seed)) and numbered."""
    chosen = rng.sample(cwe_words(num_words), num_words)
    common, uncommon = chosen[:num_cw], chosen[num_cw:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    random.Random(seed).shuffle(listed)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)), common


def cwe_text(rng: random.Random, seed: int, num_words: int, length: int, freq_cw: int, freq_ucw: int,
             num_cw: int, num_fewshot: int) -> tuple[str, list[str]]:
    """RULER's generate_input_output for cwe: few-shot examples with their answers, then the question."""
    short = length < 4096
    shots = [cwe_example(rng, seed, 20, 3, 1, num_cw) if short else cwe_example(rng, seed, 40, 10, 3, num_cw)
             for _ in range(num_fewshot)]
    context, answer = (cwe_example(rng, seed, num_words, 6, 1, num_cw) if short
                       else cwe_example(rng, seed, num_words, freq_cw, freq_ucw, num_cw))
    shown = [template("cwe").format(context=c, query="") + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(a))
             for c, a in shots]
    return "\n".join(shown) + "\n" + template("cwe").format(context=context, query=""), answer


# --- frequent words extraction -------------------------------------------------------------------------------------

def zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 by Euler-Maclaurin (error below 1e-12 with 1,000 terms)."""
    n = 1000
    head = sum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12


def fwe_vocabulary(rng: random.Random, seed: int, size: int, word_len: int) -> list[str]:
    """RULER's coded vocabulary: distinct random lower-case words, sorted, shuffled with the seed, the top one '...'."""
    vocab = {"".join(rng.choices(string.ascii_lowercase, k=word_len)) for _ in range(size)}
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    words = sorted(vocab)
    random.Random(seed).shuffle(words)
    words[0] = "..."  # the most frequent word is noise
    return words


def fwe_text(vocab: list[str], seed: int, num_words: int, alpha: float) -> tuple[str, list[str]]:
    """RULER's gen_text: rank k appears int(num_words * k^-alpha / zeta(alpha)) times, shuffled with the seed."""
    z = zeta(alpha)
    words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(num_words * k ** -alpha / z))]
    random.Random(seed).shuffle(words)
    return template("fwe").format(context=" ".join(words), query=""), vocab[1:4]


@dataclass(frozen=True)
class RulerSyntheticTask(AccuracyHeadline):
    """One of RULER's vt / cwe / fwe tasks: `samples` prompts per context length, string_match_all."""

    name: str
    version: str
    kind: Kind
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens, prompt plus max_new_tokens (empty: 1/4 to 8 x the model's trained context, less
    those too short for the prompt)."""
    samples: int = arg(20)
    """Prompts per length (RULER generates 500; 20 keeps a CPU run in minutes)."""
    max_new_tokens: int = arg(0)
    """Tokens generated per prompt (0 = RULER's: vt 30, cwe 120, fwe 50)."""
    seed: int = arg(42)
    """Seed of every prompt (RULER's random_seed)."""
    fewshot_tokens: int = arg(500)
    """vt: tokens of the in-context example at most (RULER: 500; never more than 1/8 of the length; 0 = none)."""
    query_mode: QueryMode = arg("query_agnostic")
    """`query_agnostic`: a compressing memory compresses the context before it sees the question; `query_aware`
    (kvpress' query_aware): every eviction also scores with the question's queries (the prompt after the context)."""

    def __post_init__(self) -> None:
        check_grid(self.name, self.lengths, (0.0,), self.new_tokens)
        if self.samples < 1 or self.fewshot_tokens < 0:
            raise ValueError(f"{self.name}: samples must be >= 1 and fewshot_tokens >= 0")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or TOKENS_TO_GENERATE[self.kind]

    def check(self, options: TaskOptions) -> None:
        """Generated offline: nothing to check."""

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"kind": self.kind, **task_args(self), "max_new_tokens": self.new_tokens}

    def maker(self, tokenizer: Any) -> tuple[Callable[[int, int, int], tuple[str, list[str]]], int]:
        """The prompt builder (length, sample, n) -> (text, answers) and the smallest n."""
        seed, name = self.seed, self.name
        if self.kind == "vt":
            examples: dict[int, str] = {}

            def example(length: int) -> str:
                if length not in examples:
                    budget = min(self.fewshot_tokens, length // 8)
                    fit = Fitter(name, tokenizer, 0, lambda _l, _s, n: vt_text(
                        sample_rng(seed, name, "icl"), n, 1, 4, icl=True), start=5)
                    if budget == 0 or not fit.fits(budget, 0, 5):
                        examples[length] = ""
                    else:
                        text, answer = vt_text(sample_rng(seed, name, "icl"), fit.build(budget, 0)[1].n, 1, 4,
                                               icl=True)
                        examples[length] = text + " " + " ".join(answer) + "\n"
                return examples[length]

            def vt(length: int, sample: int, n: int) -> tuple[str, list[str]]:
                text, answer = vt_text(sample_rng(seed, name, length, sample), n, 1, 4)
                shot = example(length)
                shot = randomize_icl(shot, 4, sample_rng(seed, name, length, sample, "icl")) if shot else ""
                return (shot + "\n" + text if shot else text), answer

            return vt, 5  # RULER's smallest haystack: one increment of 5 noise lines (the chain needs 5 slots)
        if self.kind == "cwe":
            def cwe(length: int, sample: int, n: int) -> tuple[str, list[str]]:
                return cwe_text(sample_rng(seed, name, length, sample), seed, n, length, 30, 3, 10, 1)

            return cwe, 11  # 10 common words and at least one uncommon
        vocabularies: dict[tuple[int, int], list[str]] = {}

        def fwe(length: int, sample: int, n: int) -> tuple[str, list[str]]:
            if (length, sample) not in vocabularies:
                size = max(4, (length - self.new_tokens) // 50)  # RULER: (max_seq_length - tokens) // 50
                vocabularies[length, sample] = fwe_vocabulary(sample_rng(seed, name, length, sample), seed, size, 6)
            return fwe_text(vocabularies[length, sample], seed, n, 2.0)

        return fwe, 8  # below 8 words no word but '...' appears

    def fitter(self, tokenizer: Any) -> Fitter:
        make, start = self.maker(tokenizer)
        return Fitter(self.name, tokenizer, self.new_tokens, make, start=start,
                      question_start=after_context(template(self.kind)))

    def fits(self, tokenizer: Any, options: TaskOptions, length: int) -> bool:
        """Whether the smallest prompt and the generation fit `length` tokens."""
        fitter = self.fitter(tokenizer)
        return fitter.fits(length, 0, fitter.start)

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        fitter = self.fitter(tokenizer)
        lengths = task_lengths(self.name, self.lengths, lm.trained_context, fitter)
        return length_result(run_lengths(self.name, lm, tokenizer, fitter, lengths, self.samples,
                                         "string_match_all", log, progress, self.query_mode))


for _kind in ("vt", "cwe", "fwe"):
    TASKS.register(f"ruler_{_kind}")(RulerSyntheticTask(name=f"ruler_{_kind}", version="1.0", kind=_kind))
