"""A study's configs found by what they are (optimizer, batch size, smoothing kind), never by
name, and the small-batch minus large-batch differences that the degradation table and the
claims are built from."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from bigbatch.report.scaling import mean_interval, welch_interval


def kind(smoothing: str) -> str:
    """The smoothing's kind: none, Mixup (alone, at any alpha) or the smoothing itself."""
    return "Mixup" if smoothing.startswith("Mixup a=") and "," not in smoothing else smoothing


def by_label(summaries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The per-seed ``summaries`` grouped by run label, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(s["label"], []).append(s)
    return groups


@dataclass
class RunGroup:
    """One config of the study: a run label and its runs (``summarize`` rows), one per seed."""

    label: str
    runs: list[dict[str, Any]]

    @property
    def batch_size(self) -> int:
        return int(self.runs[0]["batch_size"])

    @property
    def smoothing(self) -> str:
        return str(self.runs[0]["smoothing"])

    def values(self, key: str) -> list[float]:
        return [float(r.get(key, math.nan)) for r in self.runs]

    def mean_std(self, key: str) -> tuple[float, float]:
        """Mean and sample std over seeds (nan std with fewer than two)."""
        finite = [v for v in self.values(key) if not math.isnan(v)]
        if not finite:
            return math.nan, math.nan
        return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan

    def text(self, key: str, spec: str, scale: float = 1.0) -> str:
        mean, half = mean_interval(self.values(key))
        return number_text(mean * scale, half * scale, len(self.runs), spec)


def number_text(mean: float, half: float, n: int | str, spec: str) -> str:
    """``mean ± half (n=N)`` in format ``spec`` (".2f" for points of accuracy, ".0f" for counts)."""
    if math.isnan(mean):
        return "-"
    spread = "" if math.isnan(half) else f" ± {half:{spec}}"
    return f"{mean:{spec}}{spread} (n={n})"


@dataclass
class SmallLarge:
    """An optimizer's smallest and largest batch at one smoothing kind."""

    small: RunGroup
    large: RunGroup

    def terms(self, key: str, weight: float = 1.0) -> list[tuple[float, list[float]]]:
        """``weight`` x (small - large) of ``key``'s means, as welch_interval terms."""
        return [(weight, self.small.values(key)), (-weight, self.large.values(key))]

    def difference(self, key: str = "final_test_acc") -> tuple[float, float]:
        """Small minus large batch mean of ``key`` and its 95% Welch half-width."""
        return welch_interval(self.terms(key))

    def text(self, key: str = "final_test_acc") -> str:
        """The difference in points of accuracy, with both seed counts."""
        estimate, half = self.difference(key)
        seeds = f"{len(self.small.runs)}+{len(self.large.runs)}"
        return number_text(100 * estimate, 100 * half, seeds, ".2f")


class Index:
    """The study's configs by (optimizer, batch size, smoothing kind); a key that two run labels
    share is ambiguous and left out, named in ``ambiguous``."""

    def __init__(self, summaries: list[dict[str, Any]]):
        keyed: dict[tuple[str, int, str], list[RunGroup]] = {}
        for label, runs in by_label(summaries).items():
            first = runs[0]
            key = (first["optimizer"], first["batch_size"], kind(first["smoothing"]))
            keyed.setdefault(key, []).append(RunGroup(label, runs))
        self.configs = {k: v[0] for k, v in keyed.items() if len(v) == 1}
        self.ambiguous = sorted(", ".join(c.label for c in v) for v in keyed.values() if len(v) > 1)

    def get(self, optimizer: str, batch: int, smoothing: str) -> RunGroup | None:
        return self.configs.get((optimizer, batch, smoothing))

    def optimizers(self) -> list[str]:
        return sorted({k[0] for k in self.configs})

    def smoothings(self, optimizer: str) -> list[str]:
        """The optimizer's smoothing kinds, none first."""
        found = {s for o, _, s in self.configs if o == optimizer}
        return sorted(found, key=lambda s: (s != "none", s))

    def batches(self, optimizer: str, smoothing: str) -> list[int]:
        return sorted(b for o, b, s in self.configs if o == optimizer and s == smoothing)

    def settings(self) -> list[tuple[int, str]]:
        return sorted({(b, s) for _, b, s in self.configs}, key=lambda k: (k[1] != "none", k))

    def small_large(
        self, optimizer: str, smoothing: str, batches: tuple[int, int] | None = None
    ) -> SmallLarge | None:
        """The optimizer's smallest and largest batch at ``smoothing`` (or the given two)."""
        found = self.batches(optimizer, smoothing)
        if batches is None and len(found) < 2:
            return None
        small_batch, large_batch = batches or (found[0], found[-1])
        small = self.get(optimizer, small_batch, smoothing)
        large = self.get(optimizer, large_batch, smoothing)
        return SmallLarge(small, large) if small and large else None


def best_small_and_large(
    summaries: list[dict[str, Any]], large_batch_from: int
) -> tuple[SmallLarge, int, int] | None:
    """The config of highest mean final test accuracy below ``large_batch_from`` and the one at or
    above it, with how many configs each side chose from; None when a side has none."""
    groups = [RunGroup(label, runs) for label, runs in by_label(summaries).items()]
    small = [g for g in groups if g.batch_size < large_batch_from]
    large = [g for g in groups if g.batch_size >= large_batch_from]
    if not small or not large:
        return None

    def best(side: list[RunGroup]) -> RunGroup:
        return max(side, key=lambda g: g.mean_std("final_test_acc")[0])

    return SmallLarge(best(small), best(large)), len(small), len(large)
