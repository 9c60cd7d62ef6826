"""Offline lm-eval tasks built at run time from the news text of the gensim wheel (no download).

``write_tasks(DIR)`` writes, for each task, a JSON-lines data file and an ordinary lm-eval task YAML whose
``dataset_kwargs`` point at it (``dataset_path: json``), so ``--include_path DIR`` makes them runnable:

* ``fair_lee_choice``: 4-way next-fragment choice. Context: the first 24 words of a news article; choices:
  its next 6 words in their order and in three other (random) orders (multiple_choice: acc, acc_norm; chance
  1/4). Fragments of other articles as distractors were tried first: the shipped 3.7 M-parameter model
  scored 0.30-0.32 on them (100 items), too close to chance to compare quantizers.
* ``fair_lee_cloze``: 4-way next word. Context: the first 12-30 words of an article; choices: the next word
  and three other words of the same article (multiple_choice; chance 1/4).
* ``fair_lee_gen``: generate the next word after the first 12-30 words of an article (generate_until, 4
  tokens; exact_match of the first generated word, case and punctuation ignored).

The three question tasks use the first 200 articles (one question each, fewer where an article is too short).
* ``fair_lee_ppl``: the first 120 words of 30 articles (loglikelihood_rolling: word / byte perplexity).

All four carry the tag ``fair_offline``; items come from gensim's ``lee_background.cor`` (300 articles, a
domain the shipped teacher never trained on), drawn with a fixed seed, so every build is identical.
``python -m optimum_fair.eval.tasks DIR`` writes them and prints DIR. `flatten_results` turns lm-eval's
results into ``{"task/metric": value}`` rows for the model card (`export.card`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import yaml

from ..data import load_lee_texts

TAG = "fair_offline"
TASKS = ("fair_lee_choice", "fair_lee_cloze", "fair_lee_gen", "fair_lee_ppl")
SEED = 2606
#: metric names (before any ",filter" / "@filter") that model cards show as task columns
TASK_METRICS = ("acc", "acc_norm", "exact_match", "mc2", "pass@1", "word_perplexity", "bits_per_byte")
_CONTEXT_WORDS, _FRAGMENT_WORDS = 24, 6
N_ITEMS = 200  # articles per question task (of 300)


def _articles(texts: list[str]) -> list[list[str]]:
    return [t.split() for t in texts]


def choice_items(texts: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """One next-fragment question per article: its next words in their order, or in three other orders."""
    items = []
    for words in _articles(texts)[:N_ITEMS]:
        answer = words[_CONTEXT_WORDS : _CONTEXT_WORDS + _FRAGMENT_WORDS]
        choices = [" ".join(answer)]
        while len(set(answer)) > 2 and len(choices) < 4:
            shuffled = rng.sample(answer, len(answer))
            if " ".join(shuffled) not in choices:
                choices.append(" ".join(shuffled))
        if len(choices) < 4:
            continue
        order = rng.sample(range(4), 4)
        items.append({"context": " ".join(words[:_CONTEXT_WORDS]), "choices": [choices[k] for k in order],
                      "label": order.index(0)})
    return items


def _cut(words: list[str], rng: random.Random) -> int:
    return rng.randrange(12, min(30, len(words) - 10) + 1)


def _bare(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum())


def cloze_items(texts: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """One next-word question per article: the true word and three other words of the same article."""
    items = []
    for words in _articles(texts)[:N_ITEMS]:
        if len(words) < 40:
            continue
        n = _cut(words, rng)
        pool = sorted({w for w in words[n + 1 :] if _bare(w) and _bare(w) != _bare(words[n])})
        if len(pool) < 3:
            continue
        choices = [words[n], *rng.sample(pool, 3)]
        order = rng.sample(range(4), 4)
        items.append({"context": " ".join(words[:n]), "choices": [choices[k] for k in order],
                      "label": order.index(0)})
    return items


def gen_items(texts: list[str], rng: random.Random) -> list[dict[str, Any]]:
    items = []
    for words in _articles(texts)[:N_ITEMS]:
        if len(words) < 40:
            continue
        n = _cut(words, rng)
        if _bare(words[n]):
            items.append({"context": " ".join(words[:n]), "answer": words[n]})
    return items


def ppl_items(texts: list[str]) -> list[dict[str, Any]]:
    return [{"text": " ".join(words[:120])} for words in _articles(texts)[-30:]]


def _mc_config() -> dict[str, Any]:
    return {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": " ",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}


def _gen_config() -> dict[str, Any]:
    return {"output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "gen_length": 4, "steps": 4, "block_length": 4},
            "filter_list": [{"name": "first_word", "filter": [
                {"function": "regex", "regex_pattern": r"([^\s.,;:!?\"']+)", "group_select": 0},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": True}]}


def _ppl_config() -> dict[str, Any]:
    metrics = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
               "bits_per_byte": "bits_per_byte"}
    return {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in metrics.items()]}


_CONFIGS = {"fair_lee_choice": _mc_config, "fair_lee_cloze": _mc_config, "fair_lee_gen": _gen_config,
            "fair_lee_ppl": _ppl_config}


def build_items(texts: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every task's items (deterministic: one seeded generator per task)."""
    texts = load_lee_texts() if texts is None else texts
    return {"fair_lee_choice": choice_items(texts, random.Random(SEED)),
            "fair_lee_cloze": cloze_items(texts, random.Random(SEED + 1)),
            "fair_lee_gen": gen_items(texts, random.Random(SEED + 2)),
            "fair_lee_ppl": ppl_items(texts)}


def write_tasks(directory: str | Path, texts: list[str] | None = None) -> Path:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` for every offline task into ``directory``; returns it."""
    out = Path(directory).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name, items in build_items(texts).items():
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        config = {"task": name, "tag": [TAG], "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
                  **_CONFIGS[name](), "metadata": {"version": 1.0}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's results (the dict simple_evaluate returns, or its "results" part) -> {"task/metric": value}.

    ``acc,none`` -> ``task/acc``; a filtered metric ``exact_match,first_word`` -> ``task/exact_match@first_word``;
    standard errors and aliases are left out.
    """
    per_task = results.get("results", results)
    rows: dict[str, float] = {}
    for task, metrics in per_task.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            rows[f"{task}/{metric}" + ("" if filt in ("", "none") else f"@{filt}")] = float(value)
    return rows


def is_task_metric(key: str) -> bool:
    """True for a `flatten_results` key whose metric is one of TASK_METRICS."""
    if "/" not in key:
        return False
    metric = key.split("/", 1)[1].split("@", 1)[0]
    return metric in TASK_METRICS


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m optimum_fair.eval.tasks DIR")
    print(write_tasks(sys.argv[1]))
