"""Fast-dLLM's approximate KV cache in the native LLaDA, Dream and LLaDA-MoE models (issue 34, item 2).

Tolerances: a refresh (full forward through an empty DynamicCache) and the first step of every block must equal
the uncached forward exactly (torch.equal); a window forward against a cache of the *same* canvas differs from
the full forward only by float summation order (atol 1e-5 on logits of magnitude ~1).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from optimum_fair.modeling.kv_cache import ApproximateCache
from optimum_fair.scoring.sampler import dream_decode, llada_decode
from tests.conftest import tiny_dream, tiny_llada, tiny_llada2, tiny_lladamoe

VOCAB, MASK = 40, 39
SHIFT = {"llada": 0, "lladamoe": 0, "dream": 1}


def make(family: str, scale: float = 30.0):
    model = {"llada": lambda: tiny_llada(VOCAB, MASK), "lladamoe": lambda: tiny_lladamoe(VOCAB, MASK),
             "dream": lambda: tiny_dream(VOCAB, MASK)}[family]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)  # confident enough for parallel commits
    return model


FAMILIES = ["llada", "lladamoe", "dream"]
X = torch.randint(3, MASK, (2, 20), generator=torch.Generator().manual_seed(1))
X[:, 12:] = MASK
PAD = torch.ones(2, 20, dtype=torch.long)
PAD[1, :3] = 0  # row 1 left-padded


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad", [None, PAD])
@torch.no_grad()
def test_caching_off_and_a_refresh_give_the_plain_forward_exactly(family, pad):
    model = make(family)
    plain = model(X, attention_mask=pad).logits
    assert torch.equal(model(X, attention_mask=pad, use_cache=False).logits, plain)
    blocks = model.model.transformer.blocks if family == "llada" else model.model.layers
    for name in ("past_key_values", "cache"):  # the argument's name before / since transformers 5.25
        cache = DynamicCache()
        out = model(X, attention_mask=pad, use_cache=True, **{name: cache})
        assert torch.equal(out.logits, plain)
        assert cache.get_seq_length() == 20 and len(cache.layers) == len(blocks)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("pad", [None, PAD])
@torch.no_grad()
def test_a_window_on_the_cached_canvas_equals_the_full_forward(family, mode, pad):
    model = make(family)
    cache = ApproximateCache(model, mode)
    full = cache.refresh(X, pad)  # (2, 20, vocab)
    end = 20 if mode == "prefix" else 16
    win = cache.window(X, pad, 12, end)
    assert win.shape == (2, end - 12, VOCAB)
    torch.testing.assert_close(win, full[:, 12:end], atol=1e-5, rtol=0)
    x2 = X.clone()
    x2[:, 13] = 5  # a commit inside the block changes what the window sees
    moved = cache.window(x2, pad, 12, end)
    assert not torch.allclose(moved, win, atol=1e-5)


class Recording(ApproximateCache):
    """ApproximateCache that keeps every refreshed canvas and its logits."""

    def __init__(self, model, mode):
        super().__init__(model, mode)
        self.refreshes, self.windows = [], []

    def refresh(self, x, attention_mask):
        logits = super().refresh(x, attention_mask)
        self.refreshes.append((x.clone(), logits))
        return logits

    def window(self, x, attention_mask, start, end):
        self.windows.append((start, end))
        return super().window(x, attention_mask, start, end)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@torch.no_grad()
def test_cached_decode_refreshes_exactly_at_each_block_start(family, mode):
    model = make(family)
    prompt = X[:, :8]
    cache = Recording(model, mode)
    trace = llada_decode(lambda x, attention_mask=None: model(x).logits, prompt, 16, 8, 16, MASK,
                         logit_shift=SHIFT[family], threshold=0.7, cache=cache, record_states=True)
    assert len(cache.refreshes) == 2  # one per block
    for block, (x, logits) in enumerate(cache.refreshes):
        assert torch.equal(x, trace.states[8 * block])  # the state before the block's first step
        assert torch.equal(logits, model(x).logits)  # tolerance 0
    start = 8 - SHIFT[family]
    expected = {(start, 24) if mode == "prefix" else (start, 16), (start + 8, 24)}
    assert set(cache.windows) <= expected and cache.windows  # later steps read windows only
    assert trace.policy.endswith(f"+threshold0.7+{mode}") and not (trace.generated == MASK).any()


class ExactCache:
    """A 'cache' whose windows are sliced from a fresh full forward: cached decoding must then equal uncached."""

    def __init__(self, model, mode):
        self.model, self.mode = model, mode

    def refresh(self, x, attention_mask):
        return self.model(x, attention_mask=attention_mask).logits

    def window(self, x, attention_mask, start, end):
        return self.model(x, attention_mask=attention_mask).logits[:, start:end]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@torch.no_grad()
def test_samplers_read_the_right_window_positions(family, mode):
    model = make(family)
    fn = lambda x, attention_mask=None: model(x, attention_mask=attention_mask).logits  # noqa: E731
    prompt, mask = X[:, :8], PAD[:, :8]
    for rule in (dict(), dict(threshold=0.7)):
        plain = llada_decode(fn, prompt, 16, 8, 16, MASK, logit_shift=SHIFT[family], attention_mask=mask, **rule)
        cached = llada_decode(fn, prompt, 16, 8, 16, MASK, logit_shift=SHIFT[family], attention_mask=mask,
                              cache=ExactCache(model, mode), **rule)
        assert torch.equal(plain.sequences, cached.sequences) and torch.equal(plain.commit_step, cached.commit_step)
    plain = dream_decode(fn, prompt, 12, 12, MASK, alg="maskgit_plus", logit_shift=SHIFT[family], factor=1.0)
    cached = dream_decode(fn, prompt, 12, 12, MASK, alg="maskgit_plus", logit_shift=SHIFT[family], factor=1.0,
                          cache=ExactCache(model, mode))
    assert torch.equal(plain.sequences, cached.sequences)


@torch.no_grad()
def test_cached_decode_stays_close_to_uncached():
    """The approximation on a tiny model: most tokens agree (a sanity bound, not a quality claim)."""
    model = make("llada")
    fn = lambda x, attention_mask=None: model(x).logits  # noqa: E731
    prompts = torch.randint(3, MASK, (4, 8), generator=torch.Generator().manual_seed(2))
    plain = llada_decode(fn, prompts, 16, 8, 16, MASK, threshold=0.9)
    for mode in ("prefix", "dual"):
        cached = llada_decode(fn, prompts, 16, 8, 16, MASK, threshold=0.9, cache=ApproximateCache(model, mode))
        assert float((cached.generated == plain.generated).double().mean()) >= 0.5


def test_unsupported_family_and_mode_are_refused_by_name():
    with pytest.raises(ValueError, match="cache='prefix': LLaDA2MoeModelLM has no approximate KV cache"):
        ApproximateCache(tiny_llada2(VOCAB, MASK), "prefix")
    with pytest.raises(ValueError, match="cache must be one of \\['prefix', 'dual'\\]"):
        ApproximateCache(make("llada"), "full")
    with pytest.raises(RuntimeError, match="refresh"):
        ApproximateCache(make("llada"), "dual").window(X, None, 12, 16)
    with pytest.raises(ValueError, match="cache: classifier-free guidance"):
        llada_decode(lambda x: x, X[:, :8], 8, 8, 8, MASK, cfg_scale=1.0, cache=ApproximateCache(make("llada"), "dual"))
