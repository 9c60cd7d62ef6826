"""Offline text loading, wiki markup cleaning, the article split and calibration windows."""

from __future__ import annotations

import itertools

import datasets
import pytest
import torch
from datasets import Dataset

from optimum_fair import data
from optimum_fair.data import (
    VALIDATION_EVERY,
    calibration_sequences,
    clean_wiki_markup,
    load_texts,
    load_wiki_articles,
    split_wiki_articles,
    token_stream,
)
from optimum_fair.modeling.tokens import require_mask_token
from scripts.train_teacher import train_tokenizer


@pytest.fixture(scope="module")
def articles() -> list[tuple[str, str]]:
    return load_wiki_articles()


@pytest.fixture(scope="module")
def lee() -> Dataset:
    return load_texts("lee")


@pytest.fixture(scope="module")
def tokenizer(lee: Dataset):
    return train_tokenizer(list(lee["text"]), vocab_size=300, model_max_length=64)


def test_split_is_disjoint_deterministic_and_complete(articles):
    train = split_wiki_articles(articles, "train")
    val = split_wiki_articles(articles, "validation")
    train_titles, val_titles = {t for t, _ in train}, {t for t, _ in val}
    assert not train_titles & val_titles
    assert len(train) + len(val) == len(articles) >= 100
    expected_val = len(range(0, len(articles), VALIDATION_EVERY))
    assert len(val) == expected_val
    # the split depends on titles only, not on input order
    assert split_wiki_articles(list(reversed(articles)), "validation") == val
    with pytest.raises(ValueError, match="split"):
        split_wiki_articles(articles, "test")


def test_load_texts_wiki_matches_split_and_reparse(articles):
    val = load_texts("wiki-val")
    assert list(val["title"]) == [t for t, _ in split_wiki_articles(articles, "validation")]
    with pytest.raises(ValueError, match="split for 'wiki'"):
        load_texts("wiki", split="test")
    with pytest.raises(ValueError, match="'wiki-val' is the validation split"):
        load_texts("wiki-val", split="train")


def test_markup_is_stripped(articles):
    text = "\n".join(t for _, t in articles)
    assert len(text) > 2_000_000
    for marker in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "==", "&nbsp;"):
        assert marker not in text, marker


def test_clean_wiki_markup_on_a_handmade_article():
    raw = (
        "{{Infobox thing|name=X}}\n'''Foo''' is a [[bar (thing)|bar]] that [[baz]] people like.<ref>Cite</ref>\n"
        "==History==\n* Foo was made in the year 1900 by someone.\n"
        "{| class=\"wikitable\"\n| a || b\n|}\nshort caption\n"
        "==References==\nEverything after this heading is dropped entirely.\n"
    )
    assert clean_wiki_markup(raw) == "Foo is a bar that baz people like.\nFoo was made in the year 1900 by someone."


def test_lee_loads(lee):
    assert len(lee) == 300
    assert lee["text"][0].startswith("Hundreds of people have been forced")


def test_list_and_dataset_inputs():
    ds = load_texts(["one text", "another text"])
    assert ds.column_names == ["text"] and list(ds["text"]) == ["one text", "another text"]
    user = Dataset.from_dict({"text": ["a b c"], "label": [1]})
    assert load_texts(user) is user


@pytest.mark.parametrize(
    "bad, match",
    [
        ("no-such-corpus", "accepted names are .*wiki.*lee"),
        (Dataset.from_dict({"sentence": ["x"]}), "needs a 'text' column \\(or 'input_ids'"),
        ([], "non-empty list of strings"),
        (["ok", 3], "non-empty list of strings"),
        (42, "expected a dataset name"),
        (Dataset.from_dict({"text": list(range(10))}), "'text' column must hold strings, it holds Value\\('int64'"),
    ],
)
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        load_texts(bad)


def test_hub_name_offline_suggests_offline_names(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match=r"could not load dataset 'wikitext2'.*'wiki', 'wiki-val', 'lee'"):
        load_texts("wikitext2")


def test_hub_name_maps_to_load_dataset_arguments(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Dataset.from_dict({"text": ["a line", "", "  ", "another line"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_texts("wikitext2")
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train"})]
    assert list(ds["text"]) == ["a line", "another line"]


def test_token_stream_joins_documents_with_eos(tokenizer):
    stream = token_stream(["hello world", "hello again"], tokenizer)
    eos = tokenizer.eos_token_id
    assert stream.dtype == torch.long
    assert (stream == eos).sum().item() == 2 and stream[-1].item() == eos
    first = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert stream[: len(first)].tolist() == first


def test_pretokenized_rows_give_the_stream_and_windows_of_their_text(tokenizer, lee):
    texts = lee.select(range(40))
    docs = [t for t in texts["text"] if t.strip()]
    rows = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    expected = [t for row in rows for t in [*row, eos]]  # brute force: each document, then EOS
    # an empty and a null row add nothing; rows after a select keep their order
    ids = Dataset.from_dict({"input_ids": [[], *rows[:5], None, *rows[5:]], "n": list(range(len(rows) + 2))})
    assert token_stream(ids, tokenizer).tolist() == expected == token_stream(texts, tokenizer).tolist()
    shuffled = ids.select(list(reversed(range(len(ids)))))
    assert token_stream(shuffled, tokenizer).tolist() == [t for row in reversed(rows) for t in [*row, eos]]
    assert torch.equal(calibration_sequences(ids, tokenizer, 6, 32, seed=3),
                       calibration_sequences(texts, tokenizer, 6, 32, seed=3))


@pytest.mark.parametrize("rows, match", [
    ([[1, 2], [3, -1]], r"row 1 holds -1; expected token ids in \[0, 300\)"),
    ([[1, 2], [], [3, 300]], r"row 2 holds 300"),
    ([[1.5, 2.0]], r"lists of integer token ids, it holds list<item: double>"),
    ([["a"]], r"lists of integer token ids"),
    ([[], [], []], r"holds no non-empty row"),  # all empty: not "list<item: null>" (issue 32 W18)
])
def test_pretokenized_rows_outside_the_vocabulary_are_refused(tokenizer, rows, match):
    with pytest.raises(ValueError, match=match):
        token_stream(Dataset.from_dict({"input_ids": rows}), tokenizer)


def test_calibration_sequences_shape_determinism_and_source(tokenizer, lee):
    texts = lee.select(range(40))
    a = calibration_sequences(texts, tokenizer, num_samples=6, seq_len=32, seed=0)
    b = calibration_sequences(texts, tokenizer, num_samples=6, seq_len=32, seed=0)
    c = calibration_sequences(texts, tokenizer, num_samples=6, seq_len=32, seed=1)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = token_stream(texts, tokenizer).tolist()
    starts = []
    for row in a.tolist():  # every window is a contiguous slice of the stream
        hits = [i for i in range(len(stream) - 31) if stream[i : i + 32] == row]
        assert hits
        starts.append(hits[0])
    gaps = sorted(starts)
    assert all(y - x >= 32 for x, y in itertools.pairwise(gaps))  # non-overlapping


def test_too_short_text_raises_with_counts(tokenizer):
    n = token_stream(["a very short text"], tokenizer).numel()
    with pytest.raises(ValueError, match=rf"the texts give {n} tokens, but 4 non-overlapping windows of {n} tokens "
                                         rf"need num_samples\*seq_len = {4 * n} \(lower"):
        calibration_sequences(["a very short text"], tokenizer, num_samples=4, seq_len=n)
    out = calibration_sequences(["a very short text"], tokenizer, num_samples=4, seq_len=n, allow_overlap=True)
    assert out.shape == (4, n)
    with pytest.raises(ValueError, match=rf"give {n} tokens, but windows of {n + 1} tokens \(overlapping\) need"):
        calibration_sequences(["a very short text"], tokenizer, 1, n + 1, allow_overlap=True)
    with pytest.raises(ValueError, match="num_samples"):
        calibration_sequences(["text"], tokenizer, 0, 4)


def test_require_mask_token(tokenizer):
    assert require_mask_token(tokenizer) == tokenizer.convert_tokens_to_ids("<|mask|>")

    class NoMask:
        mask_token_id = None

    with pytest.raises(ValueError, match="no mask token"):
        require_mask_token(NoMask())


def test_missing_gensim_file_raises():
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        data.gensim_data_file("no-such-file.txt")


def test_one_huge_text_is_tokenized_only_as_far_as_the_windows_need(tokenizer):
    """issue 32 W20: a 20 MB text took 111 s to give 8 windows of 32 tokens; now about 2**20 tokens are made."""
    calls = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, texts, **kwargs):
            calls.append(len(texts) if isinstance(texts, str) else sum(map(len, texts)))
            return tokenizer(texts, **kwargs)

    huge = "abcdefgh " * 600_000  # 5.4 M characters
    ids = calibration_sequences([huge, "never reached"], Counting(), num_samples=8, seq_len=32, seed=0)
    assert ids.shape == (8, 32) and sum(calls) < len(huge) / 2
    assert all(n <= data._PIECE_CHARS for n in calls)
    again = calibration_sequences([huge, "never reached"], Counting(), num_samples=8, seq_len=32, seed=0)
    assert torch.equal(ids, again)
    short = "abcdefgh " * 1000  # under the budget: the whole text, as before
    assert token_stream([short], Counting(), max_tokens=1 << 20).tolist() == token_stream([short], tokenizer).tolist()


def test_readme_calibration_text_is_enough_for_its_config():
    """issue 32 N7: the README's texts=["your calibration text", "..."] raised; its texts now fill the config."""
    from pathlib import Path

    from transformers import AutoTokenizer

    import optimum_fair

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert 'texts=load_texts("lee")' in readme and "your calibration text" not in readme
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    assert calibration_sequences(load_texts("lee"), tok, num_samples=128, seq_len=128).shape == (128, 128)
