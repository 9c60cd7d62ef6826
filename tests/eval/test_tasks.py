"""The offline lm-eval tasks: built from the lee text, deterministic, loadable by lm-eval's own TaskManager."""

from __future__ import annotations

import json

import pytest

from optimum_fair.data import load_lee_texts
from optimum_fair.eval.tasks import TAG, TASKS, build_items, flatten_results, is_task_metric, write_tasks

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def items():
    return build_items()


def test_items_are_deterministic_and_sized(items):
    assert build_items() == items
    assert {k: len(v) for k, v in items.items()} == {"fair_lee_choice": 200, "fair_lee_cloze": 200,
                                                     "fair_lee_gen": 200, "fair_lee_ppl": 30}


def test_choice_label_is_the_true_continuation(items):
    texts = load_lee_texts()
    for item, text in zip(items["fair_lee_choice"], texts, strict=False):
        words = text.split()
        assert item["context"] == " ".join(words[:24])
        assert item["choices"][item["label"]] == " ".join(words[24:30])
        assert len(set(item["choices"])) == 4
        assert all(sorted(c.split()) == sorted(words[24:30]) for c in item["choices"])  # same words, reordered
    labels = [item["label"] for item in items["fair_lee_choice"]]
    assert {labels.count(k) for k in range(4)} <= set(range(30, 71))  # the answer's slot is shuffled


def test_cloze_and_gen_answer_the_next_word(items):
    texts = {" ".join(t.split()[:40]): t.split() for t in load_lee_texts()}

    def source(context):
        return next(words for words in texts.values() if " ".join(words).startswith(context + " "))

    for item in items["fair_lee_cloze"][:50]:
        words = source(item["context"])
        n = len(item["context"].split())
        assert item["choices"][item["label"]] == words[n]
        assert all(c in words[n + 1:] for i, c in enumerate(item["choices"]) if i != item["label"])
    for item in items["fair_lee_gen"][:50]:
        words = source(item["context"])
        assert item["answer"] == words[len(item["context"].split())]


def test_lm_eval_task_manager_loads_the_written_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    out = write_tasks(tmp_path / "tasks")
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{t}.yaml" for t in TASKS] + [f"{t}.jsonl" for t in TASKS])
    manager = TaskManager(include_path=str(out))
    assert set(TASKS) <= set(manager.all_tasks) and TAG in manager.all_tags
    flat = manager.load([TAG])["tasks"]
    assert set(flat) == set(TASKS)
    choice = flat["fair_lee_choice"]
    docs = list(choice.test_docs())
    first = json.loads((out / "fair_lee_choice.jsonl").read_text().splitlines()[0])
    assert len(docs) == 200 and docs[0]["context"] == first["context"]
    assert choice.doc_to_choice(docs[0]) == first["choices"] and choice.doc_to_target(docs[0]) == first["label"]
    assert choice.OUTPUT_TYPE == "multiple_choice" and flat["fair_lee_gen"].OUTPUT_TYPE == "generate_until"
    assert flat["fair_lee_ppl"].OUTPUT_TYPE == "loglikelihood_rolling"


def test_flatten_results_and_task_metrics():
    results = {"results": {
        "fair_lee_choice": {"alias": "fair_lee_choice", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.4},
        "fair_lee_gen": {"exact_match,first_word": 0.25, "exact_match_stderr,first_word": 0.05},
        "fair_lee_ppl": {"word_perplexity,none": 90.0, "sample_len": 30}}}
    rows = flatten_results(results)
    assert rows == {"fair_lee_choice/acc": 0.5, "fair_lee_choice/acc_norm": 0.4,
                    "fair_lee_gen/exact_match@first_word": 0.25, "fair_lee_ppl/word_perplexity": 90.0}
    assert flatten_results(results["results"]) == rows
    assert all(is_task_metric(k) for k in rows)
    assert not is_task_metric("nll") and not is_task_metric("lee/nll") and not is_task_metric("task/brier")
