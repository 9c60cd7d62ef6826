"""The decoding policy (`scoring.decoding.DecodePolicy`) applied to a model: its checks against the model's
family, the model-backed approximate KV cache, and the trace name a greedy decode under it carries."""

from __future__ import annotations

from typing import Any

from ..enums import CacheMode
from ..modeling.kv_cache import ApproximateCache, check_cache_mode
from ..scoring.decoding import DecodePolicy

__all__ = ["make_policy", "policy_cache", "trace_policy"]


def policy_cache(model: Any, policy: DecodePolicy) -> ApproximateCache | None:
    """The model behind the policy's approximate KV cache, or None without one."""
    return None if policy.cache is CacheMode.NONE else ApproximateCache(model, policy.cache.value)


def trace_policy(policy: DecodePolicy) -> str:
    """The ``DecodeTrace.policy`` string of a greedy decode under ``policy``, e.g. llada/low_confidence+prefix."""
    return "llada/low_confidence" + "".join(f"+{p}" for p in policy.name.split("+") if p != "schedule")


def make_policy(model: Any, decode: str, threshold: float, factor: float, cache: str) -> DecodePolicy:
    """The checked `DecodePolicy`; a cache mode the model's family cannot run is refused by name."""
    policy = DecodePolicy(decode, threshold=threshold, factor=factor, cache=cache)
    if policy.cache is not CacheMode.NONE:
        check_cache_mode(model, policy.cache.value)
    return policy
