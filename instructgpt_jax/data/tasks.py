"""Instruction-task suite and noisy labeler: the project's embedded default "humans".

InstructGPT's labelers write demonstrations and rank K model outputs (Ouyang et al. 2022, §3.4-3.5).
Here a program stands in for them, so every experiment can measure *true* quality on a 2-core CPU:

* eight instruction families whose answers a program checks with partial credit (one is held out
  from training to measure generalisation: it composes two training skills);
* `gold_score`: the true quality of a response in [0, 1], parsed from the prompt text alone;
* `Labeler`: writes demonstrations with plausible mistakes and ranks responses by gold score plus
  Gaussian noise, calibrated so two labelers agree on ~73% of pairs like InstructGPT's labelers;
* JSONL writers for the project's demonstration / comparison / prompt formats, a pretraining text
  stream, and GPT-3-style few-shot prompts.

Template: a prompt is one instruction line followed by ANSWER_MARKER; the completion is
COMPLETION_PREFIX + answer, so prompt + completion is exactly the text the model sees (EOS is
appended by the tokenizer code, never written as text). Sizes suit a tiny model: prompts <= 50
characters, answers <= 19, operands single digits (the prototype could not learn multi-digit add).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

ANSWER_MARKER = "\nAnswer:"
PROMPT_TEMPLATE = "{instruction}" + ANSWER_MARKER
COMPLETION_PREFIX = " "
EXAMPLE_SEPARATOR = "\n\n"  # between the task description and the solved examples of a few-shot prompt

SPLITS = ("train", "validation", "test")
_SPLIT_CUMULATIVE = (0.8, 0.9)  # 80 / 10 / 10 % of the prompt space, by a hash of the instruction

UNENDED_CREDIT = 0.5  # gold credit multiplier for a response that never emitted EOS (prototype's choice)
MIN_RESPONSES, MAX_RESPONSES = 2, 9  # labelers ranked K = 4..9 responses (§3.5); fewer is no comparison
TARGET_AGREEMENT = 0.726  # training labelers agreed on 72.6 +- 1.5% of comparisons (§3.4, App. B)
LABELER_NOISE = 0.32  # std of the labeler's perception noise: calibrate_noise() -> 0.320 (agreement 0.726)
DEMO_ERROR_RATE = 0.2  # greedy decoding averages such mistakes out, sampling does not: PPO headroom

WORDS = ("ant", "bag", "box", "bus", "car", "cat", "cup", "dog", "egg", "fan", "fox", "hat",
         "jam", "key", "map", "owl", "pen", "pig", "rug", "sun", "toy", "van", "web", "zip")
_WORD_LIST = r"(?P<items>[a-z]+(?: [a-z]+)*)"
_DIGIT_LIST = r"(?P<items>\d(?: \d)*)"


# ---------------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class _Family:
    name: str
    description: str  # the task description line of a few-shot prompt
    pattern: re.Pattern  # full match of the instruction line
    sample: Callable[[np.random.Generator], str]  # -> instruction line
    solve: Callable[[re.Match], str]  # -> reference answer; ValueError if the instruction is inconsistent
    # Single-answer families grade one token and write near misses; list families use the generic
    # longest-common-subsequence credit and list corruptions instead.
    closeness: Callable[[re.Match, str, str], float] | None = None  # (match, answer, token) -> credit
    near_miss: Callable[[re.Match, str, np.random.Generator], str] | None = None


def _items(match: re.Match) -> list[str]:
    return match["items"].split()


def _random_words(rng: np.random.Generator, low: int, high: int) -> str:
    chosen = rng.choice(len(WORDS), size=int(rng.integers(low, high + 1)), replace=False)
    return " ".join(WORDS[i] for i in chosen)


def _random_digits(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(low, high + 1))))


def _pick(match: re.Match) -> str:
    items, position = _items(match), int(match["k"])
    if position > len(items):
        raise ValueError(f"position {position} is past the end of a {len(items)}-word list")
    return items[position - 1]


def _sample_pick(rng: np.random.Generator) -> str:
    words = _random_words(rng, 2, 5)
    return f"Word {rng.integers(1, len(words.split()) + 1)} of: {words}"


def _compute(match: re.Match) -> str:
    a, b = int(match["a"]), int(match["b"])
    return str(a + b if match["op"] == "+" else a - b)


def _sample_compute(rng: np.random.Generator) -> str:
    a, b = (int(x) for x in rng.integers(0, 10, size=2))
    if rng.random() < 0.5:
        return f"Compute: {a} + {b}"
    return f"Compute: {max(a, b)} - {min(a, b)}"  # answers stay non-negative


def _number_credit(match: re.Match, answer: str, token: str) -> float:
    if not re.fullmatch(r"-?\d+", token):
        return 0.0
    return max(0.0, 1.0 - abs(int(token) - int(answer)) / 4)  # off by 1 -> 0.75, by 4 or more -> 0


def _number_near_miss(match: re.Match, answer: str, rng: np.random.Generator) -> str:
    value = int(answer)
    return str(value + 1 if value <= 0 or rng.random() < 0.5 else value - 1)


def _pick_credit(match: re.Match, answer: str, token: str) -> float:
    items, target = _items(match), int(match["k"]) - 1
    if token == answer:
        return 1.0
    if token not in items:
        return 0.0
    return 0.5 if abs(items.index(token) - target) == 1 else 0.25  # neighbour: an off-by-one count


def _pick_near_miss(match: re.Match, answer: str, rng: np.random.Generator) -> str:
    items, target = _items(match), int(match["k"]) - 1
    neighbours = [items[i] for i in (target - 1, target + 1) if 0 <= i < len(items)]
    choices = neighbours or [w for w in WORDS if w != answer]  # a one-word list has no neighbour
    return choices[int(rng.integers(len(choices)))]


def _family(name, description, prefix, items_pattern, sample_items, solve_items, **single) -> _Family:
    return _Family(
        name=name, description=description, pattern=re.compile(re.escape(prefix) + items_pattern),
        sample=lambda rng: prefix + sample_items(rng), solve=lambda m: solve_items(_items(m)), **single)


_FAMILY_LIST = (
    _family("copy", "Repeat the words exactly.", "Repeat: ", _WORD_LIST,
            lambda rng: _random_words(rng, 2, 5), " ".join),
    _family("uppercase", "Write the words in capital letters.", "Uppercase: ", _WORD_LIST,
            lambda rng: _random_words(rng, 2, 5), lambda items: " ".join(items).upper()),
    _family("count", "Say how many words there are.", "Count the words: ", _WORD_LIST,
            lambda rng: _random_words(rng, 1, 6), lambda items: str(len(items)),
            closeness=_number_credit, near_miss=_number_near_miss),
    _Family("pick", "Give the word at the stated position.",
            re.compile(r"Word (?P<k>[1-9]) of: " + _WORD_LIST),
            _sample_pick, _pick, closeness=_pick_credit, near_miss=_pick_near_miss),
    _Family("compute", "Do the arithmetic.", re.compile(r"Compute: (?P<a>\d) (?P<op>[+-]) (?P<b>\d)"),
            _sample_compute, _compute, closeness=_number_credit, near_miss=_number_near_miss),
    _family("reverse", "Write the words in reverse order.", "Reverse the words: ", _WORD_LIST,
            lambda rng: _random_words(rng, 2, 5), lambda items: " ".join(reversed(items))),
    _family("sort", "Sort the digits from smallest to largest.", "Sort the numbers: ", _DIGIT_LIST,
            lambda rng: _random_digits(rng, 2, 6), lambda items: " ".join(sorted(items))),
    _family("reverse_upper", "Write the words in reverse order, in capital letters.",
            "Reverse and uppercase: ", _WORD_LIST,
            lambda rng: _random_words(rng, 2, 5), lambda items: " ".join(reversed(items)).upper()),
)
_FAMILIES = {family.name: family for family in _FAMILY_LIST}
FAMILIES = tuple(_FAMILIES)
HELD_OUT_FAMILY = "reverse_upper"  # composes reverse + uppercase; never in train data by default
TRAIN_FAMILIES = tuple(name for name in FAMILIES if name != HELD_OUT_FAMILY)


# ---------------------------------------------------------------------------- parsing, scoring


def _instruction(prompt: str) -> str:
    """The instruction line: the last line before the final ANSWER_MARKER (earlier lines are context)."""
    if not prompt.endswith(ANSWER_MARKER):
        raise ValueError(f"not a task-suite prompt (must end with {ANSWER_MARKER!r}): {prompt!r}")
    return prompt[: -len(ANSWER_MARKER)].rsplit("\n", 1)[-1]


def _parse(prompt: str) -> tuple[_Family, re.Match, str]:
    instruction = _instruction(prompt)
    for family in _FAMILY_LIST:
        match = family.pattern.fullmatch(instruction)
        if match:
            try:
                return family, match, family.solve(match)
            except ValueError as err:
                raise ValueError(f"inconsistent {family.name} prompt {prompt!r}: {err}") from None
    raise ValueError(f"instruction {instruction!r} matches none of the task families {FAMILIES}")


def task_family(prompt: str) -> str:
    """Name of the family of a prompt (a few-shot prompt: of its final query). ValueError if none."""
    return _parse(prompt)[0].name


def reference_answer(prompt: str) -> str:
    """The correct answer (without COMPLETION_PREFIX). ValueError for a prompt not from the suite."""
    return _parse(prompt)[2]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _credit(family: _Family, match: re.Match, answer: str, response: str) -> float:
    got, want = response.split(), answer.split()
    if not got:
        return 0.0
    if family.closeness is None:  # a dropped, swapped or wrong item costs about 1/len of the credit
        return _lcs_length(got, want) / max(len(got), len(want))
    return family.closeness(match, answer, got[0]) / len(got)  # trailing junk dilutes the credit


def gold_score(prompt: str, response: str, ended: bool = True, unended_credit: float = UNENDED_CREDIT) -> float:
    """True quality of `response` to `prompt`, in [0, 1], with partial credit.

    Works from the prompt text alone, so any prompt in the suite's format can be scored, including
    a few-shot prompt (its final instruction is graded). Surrounding whitespace is ignored, so a
    decoder that drops COMPLETION_PREFIX scores the same. A response that never ended (no EOS) gets
    `unended_credit` times its credit. Raises ValueError for a prompt that is not from the suite.
    """
    family, match, answer = _parse(prompt)
    credit = _credit(family, match, answer, response)
    return credit if ended else credit * unended_credit


# ----------------------------------------------------------------------------- splits, sampling


def _as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def prompt_split(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash of its instruction line (never two splits)."""
    digest = hashlib.sha256(_instruction(prompt).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return SPLITS[int(np.searchsorted(_SPLIT_CUMULATIVE, u, side="right"))]


def _families(families: Iterable[str] | None) -> list[_Family]:
    names = TRAIN_FAMILIES if families is None else tuple(families)
    unknown = [name for name in names if name not in _FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown or empty families {unknown or names}; choose from {FAMILIES}")
    return [_FAMILIES[name] for name in names]


def _sample_prompt(family: _Family, split: str, rng: np.random.Generator) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:  # rejection: the smallest family (compute, 155 prompts) still has ~15 per split
        prompt = PROMPT_TEMPLATE.format(instruction=family.sample(rng))
        if prompt_split(prompt) == split:
            return prompt


def sample_prompts(n: int, split: str, seed: int | np.random.Generator,
                   families: Iterable[str] | None = None) -> list[str]:
    """n prompts of `split` (with replacement), families drawn uniformly. Default: TRAIN_FAMILIES,
    i.e. the held-out family is excluded from every split unless named, e.g. families=[HELD_OUT_FAMILY]."""
    rng, chosen = _as_rng(seed), _families(families)
    return [_sample_prompt(chosen[int(rng.integers(len(chosen)))], split, rng) for _ in range(n)]


def render_example(prompt: str, answer: str) -> str:
    """prompt + completion: the exact text SFT trains on (EOS excluded)."""
    return prompt + COMPLETION_PREFIX + answer


def split_example(text: str) -> tuple[str, str]:
    """Inverse of render_example: (prompt, answer)."""
    cut = text.rindex(ANSWER_MARKER) + len(ANSWER_MARKER)
    return text[:cut], text[cut:].removeprefix(COMPLETION_PREFIX)


def pretraining_documents(seed: int, split: str = "train", families: Iterable[str] | None = None) -> Iterator[str]:
    """Endless deterministic stream of solved tasks, one document each, in the SFT format."""
    rng, chosen = _as_rng(seed), _families(families)
    while True:
        prompt = _sample_prompt(chosen[int(rng.integers(len(chosen)))], split, rng)
        yield render_example(prompt, reference_answer(prompt))


def few_shot_prompt(prompt: str, k: int, seed: int | np.random.Generator, split: str = "train") -> str:
    """GPT-3-style in-context prompt: task description, k solved examples of the same family from
    `split` (distinct, never the query), then the query prompt. k = 0 is zero-shot."""
    family, _, _ = _parse(prompt)
    query = PROMPT_TEMPLATE.format(instruction=_instruction(prompt))
    rng, examples = _as_rng(seed), []
    while len(examples) < k:
        example = _sample_prompt(family, split, rng)
        if example != query and example not in examples:
            examples.append(example)
    solved = [render_example(p, reference_answer(p)) for p in examples]
    return EXAMPLE_SEPARATOR.join([family.description, *solved, query])


# ----------------------------------------------------------------------------------- labeler


def _corrupt_list(answer: str, rng: np.random.Generator) -> str:
    """A plausible slip on a list answer: drop an item, swap two neighbours, or get one item wrong."""
    tokens = answer.split()
    swaps = [i for i in range(len(tokens) - 1) if tokens[i] != tokens[i + 1]]
    edits = ["substitute"] + (["drop"] if len(tokens) > 1 else []) + (["swap"] if swaps else [])
    edit, i = edits[int(rng.integers(len(edits)))], int(rng.integers(len(tokens)))
    if edit == "drop":
        del tokens[i]
    elif edit == "swap":
        j = swaps[int(rng.integers(len(swaps)))]
        tokens[j], tokens[j + 1] = tokens[j + 1], tokens[j]
    elif tokens[i].isupper():
        tokens[i] = tokens[i].lower()  # forgot to capitalise one word
    else:
        pool = [str(d) for d in range(10)] if tokens[i].isdigit() else list(WORDS)
        pool = [t for t in pool if t != tokens[i]]
        tokens[i] = pool[int(rng.integers(len(pool)))]
    return " ".join(tokens)


def _mistake(family: _Family, match: re.Match, answer: str, rng: np.random.Generator) -> str:
    if family.near_miss is not None:
        return family.near_miss(match, answer, rng)
    return _corrupt_list(answer, rng)


class Labeler:
    """A simulated labeler. Demonstrations are correct with probability 1 - error_rate, otherwise a
    plausible mistake. Rankings sort responses by gold score + N(0, noise^2), drawn afresh per judgement;
    the default noise reproduces InstructGPT's inter-labeler agreement (see calibrate_noise).
    Stateful: one Generator seeded by `seed`, so a fresh Labeler with the same seed repeats itself."""

    def __init__(self, error_rate: float = DEMO_ERROR_RATE, noise: float = LABELER_NOISE, seed: int = 0,
                 unended_credit: float = UNENDED_CREDIT):
        if not 0.0 <= error_rate <= 1.0 or noise < 0.0:
            raise ValueError(f"need 0 <= error_rate <= 1 and noise >= 0, got {error_rate}, {noise}")
        self.error_rate, self.noise, self.unended_credit = error_rate, noise, unended_credit
        self.rng = np.random.default_rng(seed)

    def demonstrate(self, prompt: str) -> str:
        """A completion (COMPLETION_PREFIX + answer) as this labeler writes it."""
        family, match, answer = _parse(prompt)
        if self.rng.random() < self.error_rate:
            answer = _mistake(family, match, answer, self.rng)
        return COMPLETION_PREFIX + answer

    def judge(self, prompt: str, responses: Sequence[str], ended: Sequence[bool] | None = None) -> np.ndarray:
        """Perceived quality of each response: gold score plus this judgement's noise."""
        ended = [True] * len(responses) if ended is None else ended
        gold = np.array([gold_score(prompt, r, e, self.unended_credit) for r, e in zip(responses, ended)])
        return gold + self.noise * self.rng.standard_normal(len(responses))

    def rank(self, prompt: str, responses: Sequence[str], ended: Sequence[bool] | None = None) -> list[int]:
        """Indices of responses, best first. Identical strings are de-duplicated (first kept) and of
        responses the labeler sees as exactly tied only the first is kept, so that no tied pair is
        emitted (InstructGPT drops ties). With noise > 0 exact ties do not occur."""
        if len(responses) > MAX_RESPONSES:
            raise ValueError(f"at most {MAX_RESPONSES} responses per prompt (§3.5), got {len(responses)}")
        ended = [True] * len(responses) if ended is None else list(ended)
        distinct = [i for i, r in enumerate(responses) if r not in responses[:i]]
        perceived = self.judge(prompt, [responses[i] for i in distinct], [ended[i] for i in distinct])
        order, seen = [], set()
        for position in np.argsort(-perceived, kind="stable"):
            if perceived[position] not in seen:
                seen.add(perceived[position])
                order.append(distinct[position])
        return order


def comparison_record(prompt: str, responses: Sequence[str], labeler: Labeler,
                      ended: Sequence[bool] | None = None) -> dict | None:
    """{"prompt", "responses": best first} as ranked by `labeler`; None if < 2 distinct remain."""
    order = labeler.rank(prompt, responses, ended)
    if len(order) < MIN_RESPONSES:
        return None
    return {"prompt": prompt, "responses": [responses[i] for i in order]}


# ------------------------------------------------------------------------ agreement calibration

# A stand-in for what a tiny SFT policy samples (PROTOTYPE-NOTES: sampled SFT gold ~0.65): correct,
# slightly wrong (a labeler-style slip), well-formed but wrong, garbage; some never end.
_SAMPLE_MIX = {"correct": 0.45, "slip": 0.30, "wrong": 0.15, "garbage": 0.10}
_SAMPLE_UNENDED = 0.15


def simulated_policy_samples(prompt: str, k: int, seed: int | np.random.Generator) -> tuple[list[str], list[bool]]:
    """k responses (bare answers) and their ended flags, resembling a tiny SFT policy's samples."""
    rng = _as_rng(seed)
    family, match, answer = _parse(prompt)
    kinds = rng.choice(list(_SAMPLE_MIX), size=k, p=list(_SAMPLE_MIX.values()))
    responses = []
    for kind in kinds:
        if kind == "correct":
            responses.append(answer)
        elif kind == "slip":
            responses.append(_mistake(family, match, answer, rng))
        elif kind == "wrong" and rng.random() < 0.5:  # echo the input, a common failure
            responses.append(_instruction(prompt).split(": ", 1)[1])
        elif kind == "wrong":  # the answer to another task of the same family
            responses.append(reference_answer(PROMPT_TEMPLATE.format(instruction=family.sample(rng))))
        else:
            responses.append(_random_words(rng, 1, 3))
    return responses, [bool(e) for e in rng.random(k) >= _SAMPLE_UNENDED]


def labeler_agreement(n_prompts: int = 2000, k: int = 4, seed: int = 0, noise: float = LABELER_NOISE) -> float:
    """Fraction of response pairs that two independent labelers order the same way, over
    simulated_policy_samples of n_prompts train prompts, K = k. Pairs of identical strings, and
    pairs either labeler sees as exactly tied, are left out (as in InstructGPT)."""
    rng = np.random.default_rng(seed)
    first, second = (Labeler(noise=noise, seed=int(s)) for s in rng.integers(2**32, size=2))
    agree = total = 0
    for prompt in sample_prompts(n_prompts, "train", rng):
        responses, ended = simulated_policy_samples(prompt, k, rng)
        distinct = [i for i, r in enumerate(responses) if r not in responses[:i]]
        responses, ended = [responses[i] for i in distinct], [ended[i] for i in distinct]
        a, b = first.judge(prompt, responses, ended), second.judge(prompt, responses, ended)
        upper = np.triu_indices(len(responses), 1)
        da, db = np.subtract.outer(a, a)[upper], np.subtract.outer(b, b)[upper]
        untied = (da != 0) & (db != 0)
        total += int(untied.sum())
        agree += int((np.sign(da) == np.sign(db))[untied].sum())
    return agree / total


def calibrate_noise(target: float = TARGET_AGREEMENT, n_prompts: int = 20000, k: int = 4, seed: int = 0,
                    steps: int = 14) -> float:
    """Bisect the noise std at which labeler_agreement equals `target` (it falls as noise grows).
    LABELER_NOISE came from this with the defaults: 0.320, at which agreement measures 0.726-0.730
    across seeds and K = 4..6; noise 0.2 gives 0.81 and 0.5 gives 0.64."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if labeler_agreement(n_prompts, k, seed, middle) > target else (low, middle)
    return (low + high) / 2


# ---------------------------------------------------------------------------------- JSONL files


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line; returns the number of lines."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_prompts(path: str | os.PathLike, n: int, split: str, seed: int, families: Iterable[str] | None = None) -> int:
    """n {"prompt": ...} lines (the PPO / evaluation prompt format)."""
    return write_jsonl(path, ({"prompt": p} for p in sample_prompts(n, split, seed, families)))


def write_demonstrations(path: str | os.PathLike, n: int, split: str, labeler: Labeler, seed: int,
                         families: Iterable[str] | None = None) -> int:
    """n {"prompt", "completion"} lines written by `labeler` (the SFT format)."""
    prompts = sample_prompts(n, split, seed, families)
    return write_jsonl(path, ({"prompt": p, "completion": labeler.demonstrate(p)} for p in prompts))


def write_comparisons(path: str | os.PathLike, prompts: Sequence[str], responses: Sequence[Sequence[str]],
                      labeler: Labeler, ended: Sequence[Sequence[bool]] | None = None) -> int:
    """{"prompt", "responses": best first} lines for each prompt's K responses (the RM format);
    prompts left with < 2 distinct responses are skipped. Returns the number of lines."""
    ended = [None] * len(prompts) if ended is None else ended
    records = (comparison_record(p, r, labeler, e) for p, r, e in zip(prompts, responses, ended, strict=True))
    return write_jsonl(path, (record for record in records if record is not None))
