import itertools
import json

import numpy as np
import pytest

from instructgpt_jax.data import tasks

# family -> (prompt, a partially correct response)
CASES = {
    "copy": ("Repeat: cat dog sun\nAnswer:", "cat sun"),
    "uppercase": ("Uppercase: cat dog\nAnswer:", "CAT dog"),
    "count": ("Count the words: cat dog sun\nAnswer:", "4"),
    "pick": ("Word 2 of: cat dog sun\nAnswer:", "sun"),
    "compute": ("Compute: 7 - 3\nAnswer:", "5"),
    "reverse": ("Reverse the words: cat dog sun\nAnswer:", "sun cat dog"),
    "sort": ("Sort the numbers: 3 1 2\nAnswer:", "1 3 2"),
    "reverse_upper": ("Reverse and uppercase: cat dog\nAnswer:", "DOG cat"),
}
ANSWERS = {"copy": "cat dog sun", "uppercase": "CAT DOG", "count": "3", "pick": "dog", "compute": "4",
           "reverse": "sun dog cat", "sort": "1 2 3", "reverse_upper": "DOG CAT"}


def test_cases_cover_every_family():
    assert set(CASES) == set(tasks.FAMILIES) and len(tasks.FAMILIES) >= 6
    assert tasks.HELD_OUT_FAMILY in tasks.FAMILIES and tasks.HELD_OUT_FAMILY not in tasks.TRAIN_FAMILIES


@pytest.mark.parametrize("family", sorted(CASES))
def test_gold_score_full_partial_zero_and_unended(family):
    prompt, partial = CASES[family]
    answer = tasks.reference_answer(prompt)
    assert tasks.task_family(prompt) == family and answer == ANSWERS[family]
    assert tasks.gold_score(prompt, answer) == 1.0
    assert tasks.gold_score(prompt, tasks.COMPLETION_PREFIX + answer + " ") == 1.0
    for garbage in ("", "xyzzy", "%% ## !!"):
        assert tasks.gold_score(prompt, garbage) == 0.0
    assert 0.0 < tasks.gold_score(prompt, partial) < 1.0
    assert tasks.gold_score(prompt, answer, ended=False) == tasks.UNENDED_CREDIT == 0.5
    assert tasks.gold_score(prompt, partial, ended=False) == 0.5 * tasks.gold_score(prompt, partial)
    assert tasks.gold_score(prompt, answer, ended=False, unended_credit=0.2) == pytest.approx(0.2)
    assert tasks.gold_score(prompt, answer + " " + answer) < 1.0  # not stopping costs credit


def test_partial_credit_orders_mistakes():
    prompt = "Reverse the words: cat dog sun fox\nAnswer:"
    scores = [tasks.gold_score(prompt, r) for r in ("fox sun dog cat", "fox sun cat", "cat dog sun fox", "owl")]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0
    count = "Count the words: cat dog sun\nAnswer:"
    assert [tasks.gold_score(count, r) for r in ("3", "2", "5", "9")] == [1.0, 0.75, 0.5, 0.0]


def test_sampled_prompts_are_solvable_and_short():
    for family in tasks.FAMILIES:
        for prompt in tasks.sample_prompts(60, "train", 1, [family]):
            answer = tasks.reference_answer(prompt)
            assert tasks.task_family(prompt) == family and tasks.gold_score(prompt, answer) == 1.0
            assert prompt.endswith(tasks.ANSWER_MARKER) and len(prompt) <= 50 and len(answer) <= 25


@pytest.mark.parametrize("prompt", ["hello", "Repeat: cat dog", "Translate: cat\nAnswer:",
                                    "Word 5 of: cat dog\nAnswer:", "Compute: 12 + 3\nAnswer:"])
def test_prompts_not_from_the_suite_raise(prompt):
    with pytest.raises(ValueError):
        tasks.gold_score(prompt, "cat")


def test_splits_are_disjoint_and_deterministic():
    samples = {split: tasks.sample_prompts(400, split, 0, tasks.FAMILIES) for split in tasks.SPLITS}
    for split, prompts in samples.items():
        assert all(tasks.prompt_split(p) == split for p in prompts)
        assert tasks.sample_prompts(400, split, 0, tasks.FAMILIES) == prompts
    for a, b in itertools.combinations(tasks.SPLITS, 2):
        assert not set(samples[a]) & set(samples[b])
    assert tasks.sample_prompts(50, "train", 1) != tasks.sample_prompts(50, "train", 0)
    with pytest.raises(ValueError):
        tasks.sample_prompts(1, "dev", 0)


def test_held_out_family_never_in_train_data(tmp_path):
    assert tasks.HELD_OUT_FAMILY not in {tasks.task_family(p) for p in tasks.sample_prompts(800, "train", 0)}
    documents = itertools.islice(tasks.pretraining_documents(0), 800)
    assert tasks.HELD_OUT_FAMILY not in {tasks.task_family(tasks.split_example(d)[0]) for d in documents}
    held_out = tasks.sample_prompts(20, "test", 0, [tasks.HELD_OUT_FAMILY])
    assert {tasks.task_family(p) for p in held_out} == {tasks.HELD_OUT_FAMILY}


def test_demonstration_error_rate_matches_configuration():
    prompts = tasks.sample_prompts(3000, "train", 2)
    labeler = tasks.Labeler(error_rate=0.3, seed=0)
    demos = [labeler.demonstrate(p) for p in prompts]
    assert all(d.startswith(tasks.COMPLETION_PREFIX) for d in demos)
    scores = np.array([tasks.gold_score(p, d) for p, d in zip(prompts, demos)])
    assert abs(np.mean(scores < 1.0) - 0.3) < 0.03
    assert np.all(scores[scores < 1.0] > 0.0)  # mistakes are plausible slips, not garbage
    again = tasks.Labeler(error_rate=0.3, seed=0)
    assert [again.demonstrate(p) for p in prompts] == demos
    always_wrong = tasks.Labeler(error_rate=1.0, seed=0)
    for prompt in ["Word 1 of: cat\nAnswer:", "Repeat: cat\nAnswer:", "Sort the numbers: 1 1\nAnswer:"]:
        assert 0.0 <= tasks.gold_score(prompt, always_wrong.demonstrate(prompt)) < 1.0
    perfect = tasks.Labeler(error_rate=0.0, seed=0)
    assert all(tasks.gold_score(p, perfect.demonstrate(p)) == 1.0 for p in prompts[:300])


def test_labeler_agreement_is_calibrated_to_instructgpt():
    assert abs(tasks.labeler_agreement(1500, 4, seed=0) - 0.73) <= 0.03
    assert tasks.labeler_agreement(300, 4, seed=0, noise=0.0) == 1.0
    assert tasks.labeler_agreement(300, 4, seed=0, noise=2.0) < 0.6


def test_simulated_policy_samples_mix_quality_and_endings():
    prompts = tasks.sample_prompts(300, "train", 3)
    rng = np.random.default_rng(0)
    samples = [tasks.simulated_policy_samples(p, 4, rng) for p in prompts]
    scores = np.array([tasks.gold_score(p, r, e) for p, (rs, es) in zip(prompts, samples) for r, e in zip(rs, es)])
    ended = np.array([e for _, es in samples for e in es])
    assert 0.5 < scores.mean() < 0.8 and 0.05 < 1 - ended.mean() < 0.25
    assert np.mean(scores == 1.0) > 0.3 and np.mean(scores == 0.0) > 0.05 and np.mean((scores > 0) & (scores < 1)) > 0.2


def test_comparisons_best_first_deduplicated_and_none_when_too_few():
    prompt = "Reverse the words: cat dog sun fox\nAnswer:"
    responses = ["cat dog", "fox sun dog cat", "fox sun cat", "owl", "fox sun cat", "fox sun dog cat owl"]
    exact = tasks.Labeler(noise=0.0, seed=0)
    record = tasks.comparison_record(prompt, responses, exact)
    assert record == {"prompt": prompt, "responses": ["fox sun dog cat", "fox sun dog cat owl", "fox sun cat", "cat dog", "owl"]}
    # An unfinished best answer (credit halved) ranks below a finished partial one.
    unended = tasks.comparison_record(prompt, ["fox sun dog cat", "fox sun dog"], exact, ended=[False, True])
    assert unended["responses"] == ["fox sun dog", "fox sun dog cat"]
    # Exact ties are not emitted: of two different answers with equal credit only the first stays.
    assert tasks.comparison_record(prompt, ["fox sun cat", "fox sun dog", "owl"], exact)["responses"] == ["fox sun cat", "owl"]
    assert tasks.comparison_record(prompt, ["owl", "pig", "fox sun dog cat"], exact)["responses"] == ["fox sun dog cat", "owl"]
    assert tasks.comparison_record(prompt, ["owl", "pig"], exact) is None
    assert tasks.comparison_record(prompt, ["owl", "owl", "owl"], tasks.Labeler(seed=0)) is None
    noisy = tasks.comparison_record(prompt, responses, tasks.Labeler(seed=5))
    order = tasks.Labeler(seed=5).rank(prompt, responses)
    assert noisy["responses"] == [responses[i] for i in order] and sorted(noisy["responses"]) == sorted(set(responses))
    with pytest.raises(ValueError):
        tasks.comparison_record(prompt, [str(i) for i in range(10)], exact)


def test_noisy_labeler_prefers_better_responses_more_often_than_not():
    prompt = "Sort the numbers: 4 2 9 1\nAnswer:"
    labeler = tasks.Labeler(seed=1)
    wins = np.mean([labeler.rank(prompt, ["1 2 9 4", "1 2 4 9"])[0] == 1 for _ in range(400)])
    assert 0.55 < wins < 0.95


def test_jsonl_files_parse_back(tmp_path):
    assert tasks.write_prompts(tmp_path / "p.jsonl", 20, "validation", 0) == 20
    prompts = [json.loads(line) for line in open(tmp_path / "p.jsonl", encoding="utf-8")]
    assert all(set(r) == {"prompt"} and tasks.prompt_split(r["prompt"]) == "validation" for r in prompts)

    assert tasks.write_demonstrations(tmp_path / "d.jsonl", 20, "train", tasks.Labeler(seed=0), 0) == 20
    demos = [json.loads(line) for line in open(tmp_path / "d.jsonl", encoding="utf-8")]
    assert all(set(r) == {"prompt", "completion"} and tasks.gold_score(r["prompt"], r["completion"]) > 0 for r in demos)

    queries = tasks.sample_prompts(10, "train", 4)
    responses = [tasks.simulated_policy_samples(p, 9, seed=i)[0] for i, p in enumerate(queries)]
    responses[0] = ["same"] * 4
    written = tasks.write_comparisons(tmp_path / "c.jsonl", queries, responses, tasks.Labeler(seed=0))
    comparisons = [json.loads(line) for line in open(tmp_path / "c.jsonl", encoding="utf-8")]
    assert written == len(comparisons) == 9
    for record in comparisons:
        assert set(record) == {"prompt", "responses"} and 2 <= len(record["responses"]) <= 9
        assert len(set(record["responses"])) == len(record["responses"])


def test_pretraining_documents_are_deterministic_solved_tasks():
    first = list(itertools.islice(tasks.pretraining_documents(7), 200))
    assert first == list(itertools.islice(tasks.pretraining_documents(7), 200))
    assert first != list(itertools.islice(tasks.pretraining_documents(8), 200))
    for document in first:
        prompt, answer = tasks.split_example(document)
        assert tasks.render_example(prompt, answer) == document and tasks.prompt_split(prompt) == "train"
        assert tasks.gold_score(prompt, answer) == 1.0 and answer == tasks.reference_answer(prompt)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_few_shot_prompt_has_k_solved_examples_of_the_family(k):
    query = tasks.sample_prompts(1, "test", 0, ["sort"])[0]
    text = tasks.few_shot_prompt(query, k, seed=0)
    assert text.endswith(query) and text == tasks.few_shot_prompt(query, k, seed=0)
    blocks = text.split(tasks.EXAMPLE_SEPARATOR)
    assert len(blocks) == k + 2 and blocks[-1] == query
    examples = [tasks.split_example(block) for block in blocks[1:-1]]
    assert len({p for p, _ in examples}) == k and query not in {p for p, _ in examples}
    for prompt, answer in examples:
        assert tasks.task_family(prompt) == "sort" and tasks.gold_score(prompt, answer) == 1.0
    # The query is what gets graded and what decides the split.
    assert tasks.task_family(text) == "sort" and tasks.reference_answer(text) == tasks.reference_answer(query)
    assert tasks.prompt_split(text) == "test"
