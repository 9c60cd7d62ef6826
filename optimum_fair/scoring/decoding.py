"""`DecodePolicy`: how a diffusion LM is decoded when it is served (issue 34), as one checked value.

The commit rule (`CommitRule`: the sampler's fixed schedule, Fast-dLLM's threshold or factor rule) and the
approximate KV cache (`CacheMode`: none, prefix or dual). Pure data: `eval` turns the cache mode into a
model-backed cache (`modeling.kv_cache.ApproximateCache`) and the rule into sampler arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..enums import CacheMode, CommitRule, coerce_enum

__all__ = ["DecodePolicy"]


@dataclass(frozen=True)
class DecodePolicy:
    """A decoding policy. ``threshold`` is read with ``rule="threshold"``, ``factor`` with ``rule="factor"``.

    Example: ``DecodePolicy("threshold", threshold=0.9, cache="dual").name == "threshold0.9+dual"``.
    """

    rule: CommitRule | str = CommitRule.SCHEDULE
    threshold: float = 0.9
    factor: float = 1.0
    cache: CacheMode | str = CacheMode.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", coerce_enum(CommitRule, self.rule, "decode"))
        object.__setattr__(self, "cache", coerce_enum(CacheMode, self.cache, "cache"))
        t, f = self.threshold, self.factor
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {t!r}")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (f > 0 and math.isfinite(f)):
            raise ValueError(f"factor must be a finite number > 0, got {f!r}")

    @property
    def name(self) -> str:
        """``schedule``, ``threshold0.9``, ``factor1+prefix``, ...: how tables and traces name the policy."""
        rule = {CommitRule.SCHEDULE: "schedule", CommitRule.THRESHOLD: f"threshold{self.threshold:g}",
                CommitRule.FACTOR: f"factor{self.factor:g}"}[self.rule]
        return rule if self.cache is CacheMode.NONE else f"{rule}+{self.cache.value}"

    def rule_kwargs(self) -> dict[str, float]:
        """``threshold=`` / ``factor=`` for `llada_decode` / `dream_decode` (empty for the fixed schedule)."""
        if self.rule is CommitRule.THRESHOLD:
            return {"threshold": float(self.threshold)}
        if self.rule is CommitRule.FACTOR:
            return {"factor": float(self.factor)}
        return {}

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule.value, "threshold": self.threshold, "factor": self.factor,
                "cache": self.cache.value}
