"""Calibration and held-out text as ``datasets.Dataset``, plus fixed-length token windows.

Offline text comes from files that the ``gensim`` wheel ships (read from site-packages at run time,
never copied into this repository, since the Wikipedia text is CC BY-SA):

* ``"wiki"`` / ``"wiki-val"``: the shortened English Wikipedia dump
  ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, stripped to plain prose and
  split by article: articles are sorted by title and every 20th one (index 0, 20, 40, ...) is validation.
* ``"lee"``: ``lee_background.cor``, 300 news articles (one per line), a second, held-out domain.
* ``"lee-test"``: ``lee.cor``, 49 other news articles of the same corpus (its test set). No study or
  benchmark of this package evaluated on it before `benchmarks/confirm.py`: the confirmatory split.

Other names (``"wikitext2"``, ``"c4"``, ``"pileval"``, ``"ptb"``) go through ``datasets.load_dataset``
and need network access (or a warm local cache).

Example::

    texts = load_texts("wiki")                       # Dataset with columns "title", "text"
    ids = calibration_sequences(texts, tok, num_samples=128, seq_len=512)   # (128, 512) LongTensor
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from .naming import is_repo_id, source_name

logger = logging.getLogger(__name__)

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
LEE_TEST_FILE = "lee.cor"
VALIDATION_EVERY = 20  # every 20th article (sorted by title) is validation
OFFLINE_NAMES = ("wiki", "wiki-val", "lee", "lee-test")
_MIN_WORDS_PER_LINE = 5  # shorter lines are captions, table cells and list debris
_END_SECTIONS = ("references", "see also", "external links", "notes", "further reading", "bibliography",
                 "sources", "footnotes", "citations")


@dataclass(frozen=True)
class HubTextSource:
    """How a hub dataset name maps onto ``datasets.load_dataset`` arguments."""

    path: str
    config: str | None = None
    split: str = "train"
    column: str = "text"
    data_files: str | None = None


HUB_NAMES: dict[str, HubTextSource] = {
    "wikitext2": HubTextSource("wikitext", "wikitext-2-raw-v1", split="train"),
    "c4": HubTextSource("allenai/c4", split="train", data_files="en/c4-train.00000-of-01024.json.gz"),
    "pileval": HubTextSource("mit-han-lab/pile-val-backup", split="validation"),
    "ptb": HubTextSource("ptb_text_only", "penn_treebank", split="train", column="sentence"),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_STRING_TYPES = ("string", "large_string")
_PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces cut at whitespace (see `_encoded`)
# windows are drawn from at most the first max(_DRAW_FROM * needed, _MIN_DRAW_TOKENS) tokens of the text
_DRAW_FROM = 64
_MIN_DRAW_TOKENS = 1 << 20
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_HTML_TAG = re.compile(r"<[^>\n]{0,200}>")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_EMPHASIS = re.compile(r"'{2,}")
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")


def gensim_data_file(name: str) -> Path:
    """Path of a file in the installed gensim wheel's ``test/test_data`` folder.

    Raises:
        FileNotFoundError: gensim is not installed or the file is missing.
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"offline text needs the 'gensim' package (pip install gensim) for {name!r}")
    path = Path(spec.origin).parent / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"gensim test data file {name!r} not found at {path}")
    return path


def clean_wiki_markup(raw: str) -> str:
    """Strip MediaWiki markup from one article to plain prose paragraphs separated by newlines.

    Templates, references, tables, files and comments are removed and links reduced to their text
    (``gensim.corpora.wikicorpus.filter_wiki``); then headings, bold/italic quotes, list markers and
    HTML tags are dropped, the text is cut at the first reference-like section (References, See also,
    ...), and lines with fewer than five words (captions, table debris) are discarded.
    """
    from gensim.corpora.wikicorpus import (
        filter_wiki,  # lazy: gensim loads scipy (~1 s), only offline wiki text needs it
    )

    text = html.unescape(filter_wiki(raw))
    kept: list[str] = []
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in _END_SECTIONS:
                break
            continue
        line = _LIST_MARK.sub("", line.strip())
        line = _LEFTOVER.sub("", _EMPHASIS.sub("", _HTML_TAG.sub("", line)))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if len(line.split()) >= _MIN_WORDS_PER_LINE:
            kept.append(line)
    return "\n".join(kept)


def load_wiki_articles(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Parse the gensim Wikipedia dump into ``(title, plain_text)`` pairs, sorted by title.

    Redirects, non-article namespaces and articles with no prose left after cleaning are skipped.
    Nothing is cached between calls (parsing takes about two seconds).
    """
    from gensim.corpora.wikicorpus import extract_pages  # lazy: see clean_wiki_markup

    path = Path(path) if path is not None else gensim_data_file(WIKI_FILE)
    articles: list[tuple[str, str]] = []
    with bz2.open(path, "rb") as fh:
        for title, raw, _page_id in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wiki_markup(raw)
            if text:
                articles.append((title, text))
    articles.sort(key=lambda item: item[0])
    logger.debug("parsed %d wiki articles from %s", len(articles), path)
    return articles


def split_wiki_articles(
    articles: Sequence[tuple[str, str]], split: str
) -> list[tuple[str, str]]:
    """Deterministic split by article: sorted by title, every ``VALIDATION_EVERY``-th is validation."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    ordered = sorted(articles, key=lambda item: item[0])
    want_val = split == "validation"
    return [a for i, a in enumerate(ordered) if (i % VALIDATION_EVERY == 0) == want_val]


def load_lee_texts(path: str | Path | None = None) -> list[str]:
    """The 300 news articles of gensim's ``lee_background.cor``, one string each."""
    path = Path(path) if path is not None else gensim_data_file(LEE_FILE)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _offline_dataset(name: str, split: str | None) -> Dataset:
    """Build the Dataset for one of ``OFFLINE_NAMES``."""
    if name in ("lee", "lee-test"):
        if split not in (None, "train", "test", "validation"):
            raise ValueError(f"split for {name!r} must be None (the one split), got {split!r}")
        file = gensim_data_file(LEE_FILE if name == "lee" else LEE_TEST_FILE)
        return Dataset.from_dict({"text": load_lee_texts(file)})
    wiki_split = "validation" if name == "wiki-val" else (split or "train")
    if name == "wiki-val" and split not in (None, "validation"):
        raise ValueError(f"'wiki-val' is the validation split; got split={split!r}")
    if wiki_split == "val":
        wiki_split = "validation"
    if wiki_split not in ("train", "validation"):
        raise ValueError(f"split for 'wiki' must be 'train' or 'validation', got {split!r}")
    chosen = split_wiki_articles(load_wiki_articles(), wiki_split)
    return Dataset.from_dict({"title": [t for t, _ in chosen], "text": [x for _, x in chosen]})


def _hub_dataset(name: str, split: str | None) -> Dataset:
    """Load one of ``HUB_NAMES`` with ``datasets.load_dataset``; a clear error when that fails."""
    src = HUB_NAMES[name]
    kwargs: dict[str, Any] = {"split": split or src.split}
    if src.data_files is not None:
        kwargs["data_files"] = src.data_files
    args = (src.path,) if src.config is None else (src.path, src.config)
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # any failure: offline, missing cache, hub error
        raise RuntimeError(
            f"could not load dataset {name!r} via datasets.load_dataset{args!r} ({type(err).__name__}: "
            f"{err}). Without network access use an offline name {OFFLINE_NAMES} (text shipped with "
            "gensim), or pass a list of strings or a datasets.Dataset with a 'text' column."
        ) from err
    if src.column != "text":
        ds = ds.rename_column(src.column, "text")
    return ds.select_columns(["text"]).filter(lambda row: bool(row["text"].strip()))


def load_texts(name_or_obj: str | Sequence[str] | Dataset, split: str | None = None) -> Dataset:
    """Text as a ``datasets.Dataset`` with a ``"text"`` column.

    Args:
        name_or_obj: ``"wiki"`` (train split; ``split="validation"`` for the held-out articles),
            ``"wiki-val"``, ``"lee"``, a hub name from ``HUB_NAMES`` (needs network), a list of
            strings, or a ``datasets.Dataset`` with a ``"text"`` column or an ``"input_ids"`` column of
            token ids (returned unchanged).
        split: dataset split; ``None`` picks the name's default.

    Raises:
        ValueError: unknown name, empty list, non-string items, or a Dataset without ``"text"``.
        RuntimeError: a hub dataset could not be loaded (the message lists the offline names).
    """
    if isinstance(name_or_obj, Dataset):
        if not {"text", "input_ids"} & set(name_or_obj.column_names):
            raise ValueError(
                "load_texts: the datasets.Dataset needs a 'text' column (or 'input_ids', already tokenized); "
                f"it has {name_or_obj.column_names}"
            )
        text = name_or_obj.features.get("text")
        if "input_ids" not in name_or_obj.column_names and getattr(text, "dtype", None) not in _STRING_TYPES:
            raise ValueError(f"load_texts: the datasets.Dataset's 'text' column must hold strings, it holds {text}")
        return name_or_obj
    if isinstance(name_or_obj, str):
        name = name_or_obj.strip().lower()
        if name in OFFLINE_NAMES:
            return _offline_dataset(name, split)
        if name in HUB_NAMES:
            return _hub_dataset(name, split)
        accepted = list(OFFLINE_NAMES) + list(HUB_NAMES)
        raise ValueError(
            f"load_texts: unknown dataset name {name_or_obj!r}; accepted names are {accepted}, "
            "or pass a list of strings or a datasets.Dataset with a 'text' column"
        )
    if isinstance(name_or_obj, Sequence):
        items = list(name_or_obj)
        if not items or not all(isinstance(x, str) for x in items):
            raise ValueError("load_texts: a list input must be a non-empty list of strings")
        return Dataset.from_dict({"text": items})
    raise ValueError(
        f"load_texts: expected a dataset name, a list of strings or a datasets.Dataset, "
        f"got {type(name_or_obj).__name__}"
    )


def _separator_id(tokenizer: Any) -> int | None:
    """EOS id, else SEP id, else None (documents are then concatenated without a separator)."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    logger.warning("tokenizer has neither an EOS nor a SEP token: documents are joined without separator")
    return None


def token_stream(texts: str | Sequence[str] | Dataset, tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize every document (no special tokens) and concatenate them, each followed by EOS.

    max_tokens: when the text is longer than this many characters, only the first documents are tokenized,
    until the stream holds about that many tokens (a document of over a million characters is tokenized in
    pieces cut before whitespace); a shorter text gives the same stream as without it.

    A Dataset with an ``"input_ids"`` column is already tokenized (as llm-compressor's datasets are): each
    row is one document's ids, used as they are (the tokenizer gives only the EOS id), so the stream
    equals that of the text the ids were made from with ``add_special_tokens=False``.

    Returns:
        ids: (total_tokens,) LongTensor.
    """
    ds = load_texts(texts)
    if "input_ids" in ds.column_names:
        values, lengths = _pretokenized(ds, tokenizer)
    else:
        values, lengths = _encoded(ds, tokenizer, max_tokens)
    sep = _separator_id(tokenizer)
    if sep is not None:  # EOS after each non-empty document
        values = np.insert(values, np.cumsum(lengths)[lengths > 0], sep)
    return torch.from_numpy(values)


def _encoded(ds: Dataset, tokenizer: Any, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (total,) int64, tokens per document (n_docs,)) of the non-empty documents of the "text" column
    (with max_tokens, of its first documents only: see `token_stream`)."""
    docs = [t for t in ds["text"] if t and t.strip()]
    if not docs:
        raise ValueError("token_stream: the texts contain no non-empty document")
    if max_tokens is None or sum(len(d) for d in docs) <= max_tokens:
        encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        encoded = _encoded_prefix(docs, tokenizer, max_tokens)
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    values = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    return values, lengths


def _encoded_prefix(docs: list[str], tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Token ids of the first documents, until about max_tokens: tokenized about `_PIECE_CHARS` characters
    per call, a longer document in pieces cut before whitespace (its pieces' ids joined)."""
    encoded: list[list[int]] = []
    total = 0
    for doc in docs:
        ids: list[int] = []
        for piece in _pieces(doc):
            ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
            if total + len(ids) >= max_tokens:
                break
        encoded.append(ids)
        total += len(ids)
        if total >= max_tokens:
            logger.info("tokenized the first %d of %d documents (%d tokens): enough to draw the windows from",
                        len(encoded), len(docs), total)
            break
    return encoded


def _pieces(doc: str):
    """`doc` in consecutive pieces of at most `_PIECE_CHARS` characters, each cut before a space if it has one."""
    start = 0
    while len(doc) - start > _PIECE_CHARS:
        cut = doc.rfind(" ", start + 1, start + _PIECE_CHARS)
        cut = cut if cut > start else start + _PIECE_CHARS
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def _pretokenized(ds: Dataset, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids (total,) int64, tokens per row (n_rows,)) of the "input_ids" column, checked to be integer ids of
    the tokenizer's vocabulary (read through Arrow: no Python int per token)."""
    col = ds.with_format("arrow")["input_ids"]
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    if is_list and len(col.flatten()) == 0:  # every row empty (Arrow then types the items as null)
        raise ValueError("token_stream: the dataset's 'input_ids' column holds no non-empty row")
    if not (is_list and pa.types.is_integer(col.type.value_type)):
        raise ValueError(f"token_stream: the dataset's 'input_ids' column must hold lists of integer token ids, "
                         f"it holds {col.type}")
    lengths = np.diff(col.offsets.to_numpy()).astype(np.int64)  # null rows: length 0
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    bad = np.flatnonzero((values < 0) | (values >= (vocab if vocab is not None else np.iinfo(np.int64).max)))
    if bad.size:
        row = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise ValueError(f"token_stream: 'input_ids' row {row} holds {int(values[bad[0]])}; expected token ids "
                         f"in [0, {vocab if vocab is not None else 'vocab size'})")
    return values, lengths


def calibration_sequences(
    texts: str | Sequence[str] | Dataset,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    allow_overlap: bool = False,
) -> torch.Tensor:
    """Draw ``num_samples`` equal-length token windows from the concatenated texts; no padding.

    The texts are tokenized and joined with EOS (see ``token_stream``). By default the windows are
    disjoint: the stream is cut into ``len // seq_len`` chunks after a seeded random offset, and a seeded
    random subset of chunks is returned, so ``num_samples * seq_len`` tokens are required. With
    ``allow_overlap=True`` each window starts at an independent seeded random position (GPTQ style)
    and only ``seq_len`` tokens are required. The same inputs and seed give the same tensor. A text of more
    than max(64 * the tokens required, 2**20) characters is tokenized only until the stream holds that many
    tokens, and the windows are drawn from them (one 20 MB text no longer costs minutes).

    Returns:
        ids: (num_samples, seq_len) LongTensor.

    Raises:
        ValueError: ``num_samples``/``seq_len`` not positive, or the text is too short (the message
            gives the number of tokens available and needed).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    needed = seq_len if allow_overlap else num_samples * seq_len
    stream = token_stream(texts, tokenizer, max_tokens=max(_DRAW_FROM * needed, _MIN_DRAW_TOKENS))
    total = stream.numel()
    if total < needed:
        if allow_overlap:
            need = f"windows of {seq_len} tokens (overlapping) need at least {needed}"
        else:
            need = (f"{num_samples} non-overlapping windows of {seq_len} tokens need num_samples*seq_len = "
                    f"{needed} (lower num_samples or seq_len, or pass more text)")
        raise ValueError(f"calibration_sequences: the texts give {total} tokens, but {need}")
    gen = torch.Generator().manual_seed(seed)
    if allow_overlap:
        starts = torch.randint(0, total - seq_len + 1, (num_samples,), generator=gen)
        return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    n_chunks = total // seq_len
    offset = int(torch.randint(0, total - n_chunks * seq_len + 1, (1,), generator=gen))
    chunks = stream[offset : offset + n_chunks * seq_len].view(n_chunks, seq_len)
    pick = torch.randperm(n_chunks, generator=gen)[:num_samples]
    return chunks[pick].clone()


def resolve_tokenizer(tokenizer: Any, model: Any = None, required: bool = True) -> Any:
    """A tokenizer object from an object, a path or Hub id, or (None) the model's own.

    None looks for the tokenizer beside the model: its local folder when that has tokenizer files, else
    its Hub repo. A tokenizer that was named but fails to load raises ValueError. When none can be found
    (or the model's own fails to load), ``required`` raises ValueError; otherwise it warns and returns None.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is not None:
        return _load_tokenizer(str(tokenizer))
    source = source_name(model) if model is not None else None
    local = source is not None and any((Path(source) / f).is_file() for f in _TOKENIZER_FILES)
    if local:
        return _load_tokenizer(source)
    if source is not None and is_repo_id(source):
        try:
            return _load_tokenizer(source)
        except ValueError as err:
            if required:
                raise
            logger.warning("no tokenizer: loading the model's own from %s failed (%s)", source, err)
            return None
    if required:
        raise ValueError("a tokenizer is needed: pass tokenizer= (an object or a path) or "
                         "FairCalibConfig(tokenizer=...); the model has no local tokenizer files or Hub id")
    logger.info("no tokenizer given and none beside the model")
    return None


def _load_tokenizer(path: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {path!r}: {err}") from None
