"""The reference study's claims, each tested on a study's runs with intervals over seeds.

1. K-FAC needs fewer updates than SGD to reach the target test accuracy (per batch size and
   smoothing).
2. A large batch loses final test accuracy against a small one (per optimizer, no smoothing).
3. Mixup cuts that degradation to less than half (per optimizer).
4. Mixup flattens the 1-D loss curve (per optimizer and batch size; the train-loss rise of
   analysis/flatness.py).

Runs are found by what they are (optimizer, batch size, smoothing: report/results.py), never by
name, so any study with such a grid is tested. In each setting the claim is a difference of means
D > 0 (a linear combination of configs' means over seeds) with a 95% Welch interval
(scaling.welch_interval). The small and large batch are an optimizer's smallest and largest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bigbatch.report.configs import Index, RunGroup, number_text
from bigbatch.report.scaling import mean_interval, welch_interval
from bigbatch.report.tables import markdown_table

HELD, NOT_HELD, UNDECIDED, NEEDS_SEEDS = "held", "not held", "undecided", "needs >= 2 seeds"

RULES = [
    "In each setting a claim is a difference D of means over seeds, signed so that D > 0 is what "
    "it says, with a 95% Welch interval: configs' seeds are taken as independent samples (one "
    "seed fixes the initial weights and data order, but another optimizer, batch or augmentation "
    "makes another trajectory from them; were seeds correlated, Welch would be the conservative "
    "side, and it needs no matching seed lists). Degrees of freedom by Welch-Satterthwaite, "
    "rounded down.",
    "Verdict per setting: **held** when the interval lies above 0, **not held** when below, "
    "**undecided** when it spans 0, **needs >= 2 seeds** when a config has fewer (its values are "
    "still shown). A claim is not held when one setting does not hold it, held when all do, "
    "undecided when one is undecided, otherwise it needs seeds.",
    "Config values: mean ± half-width of the 95% t-interval over seeds (n seeds).",
]


@dataclass
class Comparison:
    setting: str
    cells: list[str]  # one per column of the claim
    estimate: float
    half_width: float
    verdict: str
    note: str = ""

    @property
    def interval(self) -> tuple[float, float]:
        return self.estimate - self.half_width, self.estimate + self.half_width


@dataclass
class Claim:
    number: int
    statement: str
    rule: str  # what D is
    columns: list[str]
    scale: float  # display factor of D (100: accuracy in points)
    comparisons: list[Comparison] = field(default_factory=list)
    missing: str = ""  # why no setting could be tested

    @property
    def verdict(self) -> str:
        verdicts = [c.verdict for c in self.comparisons]
        if not verdicts:
            return "not testable"
        if NOT_HELD in verdicts:
            return NOT_HELD
        if all(v == HELD for v in verdicts):
            return HELD
        return UNDECIDED if UNDECIDED in verdicts else NEEDS_SEEDS


def _verdict(estimate: float, half_width: float) -> str:
    if math.isnan(half_width):
        return NEEDS_SEEDS
    if estimate - half_width > 0:
        return HELD
    return NOT_HELD if estimate + half_width < 0 else UNDECIDED


def _updates(config: RunGroup) -> tuple[list[float], int]:
    """Updates to the target per seed; a run that never reached it counts at its total updates,
    a lower bound; returns the values and how many are such bounds."""
    out, bounds = [], 0
    for r in config.runs:
        if math.isnan(r["updates_to_target"]):
            out.append(float(r["updates"]))
            bounds += 1
        else:
            out.append(float(r["updates_to_target"]))
    return out, bounds


def _updates_text(config: RunGroup) -> str:
    values, bounds = _updates(config)
    mean, half = mean_interval(values)
    reached = f"{len(values) - bounds} of {len(values)} reached"
    return f"{'>= ' if bounds else ''}{number_text(mean, half, len(values), '.0f')}, {reached}"


def _fewer_updates(index: Index, claim: Claim) -> None:
    for batch, smoothing in index.settings():
        sgd, kfac = index.get("SGD", batch, smoothing), index.get("K-FAC", batch, smoothing)
        if sgd is None or kfac is None:
            continue
        (s_values, s_bounds), (k_values, k_bounds) = _updates(sgd), _updates(kfac)
        estimate, half = welch_interval([(1.0, s_values), (-1.0, k_values)])
        verdict, note = _verdict(estimate, half), ""
        # A bound on SGD's side can only understate D, on K-FAC's only overstate it.
        if k_bounds and verdict == HELD or s_bounds and verdict == NOT_HELD:
            verdict = UNDECIDED
        if k_bounds or s_bounds:
            note = "runs that never reached the target count at their total updates (a bound)"
        where = f"batch {batch}, {smoothing}"
        cells = [_updates_text(sgd), _updates_text(kfac)]
        claim.comparisons.append(Comparison(where, cells, estimate, half, verdict, note))


def _degradation(index: Index, claim: Claim) -> None:
    for optimizer in index.optimizers():
        pair = index.small_large(optimizer, "none")
        if pair is None:
            continue
        estimate, half = pair.difference()
        where = f"{optimizer}, batch {pair.small.batch_size} vs {pair.large.batch_size}"
        cells = [
            pair.small.text("final_test_acc", ".2f", 100),
            pair.large.text("final_test_acc", ".2f", 100),
        ]
        claim.comparisons.append(Comparison(where, cells, estimate, half, _verdict(estimate, half)))


def _mixup_halves(index: Index, claim: Claim) -> None:
    for optimizer in index.optimizers():
        plain = index.small_large(optimizer, "none")
        if plain is None:
            continue
        batches = (plain.small.batch_size, plain.large.batch_size)
        mixed = index.small_large(optimizer, "Mixup", batches)
        if mixed is None:
            continue
        estimate, half = welch_interval(
            plain.terms("final_test_acc", 0.5) + mixed.terms("final_test_acc", -1.0)
        )
        where = f"{optimizer}, batch {batches[0]} vs {batches[1]}"
        cells = [plain.text(), mixed.text()]
        claim.comparisons.append(Comparison(where, cells, estimate, half, _verdict(estimate, half)))


def _mixup_flattens(index: Index, claim: Claim) -> None:
    unanalysed = []
    for optimizer in index.optimizers():
        for batch in index.batches(optimizer, "none"):
            plain, mixed = index.get(optimizer, batch, "none"), index.get(optimizer, batch, "Mixup")
            if plain is None or mixed is None:
                continue
            if any(math.isnan(v) for c in (plain, mixed) for v in c.values("loss_rise_1d")):
                unanalysed += [plain.label, mixed.label]
                continue
            estimate, half = welch_interval(
                [(1.0, plain.values("loss_rise_1d")), (-1.0, mixed.values("loss_rise_1d"))]
            )
            cells = [plain.text("loss_rise_1d", ".3g"), mixed.text("loss_rise_1d", ".3g")]
            claim.comparisons.append(
                Comparison(
                    f"{optimizer}, batch {batch}", cells, estimate, half, _verdict(estimate, half)
                )
            )
    if unanalysed:
        claim.missing = (
            f"no 1-D loss rise (`flatness_1d.json`) on some runs of "
            f"{', '.join(dict.fromkeys(unanalysed))}: "
            "set `flatness = true` in [study] and run `bigbatch reproduce` again"
        )


def evaluate_claims(summaries: list[dict[str, Any]], target: float) -> tuple[list[Claim], Index]:
    """Every claim with its settings, from ``summarize`` rows (one per run and seed)."""
    index = Index(summaries)
    pct = f"{100 * target:g}%"
    found = sorted({s["loss_rise_distance"] for s in summaries if "loss_rise_distance" in s})
    distance = f" at |a| = {' / '.join(f'{d:g}' for d in found)}" if found else ""
    specs: list[tuple[Claim, Callable[[Index, Claim], None]]] = [
        (
            Claim(
                1,
                f"K-FAC needs fewer updates than SGD to reach {pct} test accuracy",
                "D = SGD's updates to the target - K-FAC's (a run that never reaches it counts "
                "at its total updates, a lower bound: a bound on SGD's side can only confirm "
                "the claim, on K-FAC's only refute it; otherwise such a setting is undecided)",
                ["SGD updates", "K-FAC updates"],
                1.0,
            ),
            _fewer_updates,
        ),
        (
            Claim(
                2,
                "A large batch loses accuracy against a small one (no smoothing)",
                "D = small-batch final test accuracy - large-batch (points)",
                ["small batch test acc %", "large batch test acc %"],
                100.0,
            ),
            _degradation,
        ),
        (
            Claim(
                3,
                "Mixup cuts the large-batch degradation to less than half",
                "D = 0.5 x degradation without Mixup - degradation with Mixup (points; "
                "degradation = small-batch minus large-batch final test accuracy; read it with "
                "claim 2: without a degradation there is nothing to cut)",
                ["degradation without Mixup", "degradation with Mixup"],
                100.0,
            ),
            _mixup_halves,
        ),
        (
            Claim(
                4,
                "Mixup flattens the 1-D loss curve",
                f"D = train-loss rise{distance} without Mixup - with Mixup (`flatness_1d.json`: "
                "the mean rise on both sides along a filter-normalized random direction)",
                ["loss rise without Mixup", "loss rise with Mixup"],
                1.0,
            ),
            _mixup_flattens,
        ),
    ]
    claims = []
    for claim, fill in specs:
        fill(index, claim)
        if not claim.comparisons and not claim.missing:
            claim.missing = "the study has no runs that differ only in what this claim compares"
        claims.append(claim)
    return claims, index


def _interval_text(c: Comparison, scale: float) -> str:
    def f(v: float) -> str:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"

    estimate = c.estimate * scale
    if math.isnan(estimate):
        return "-"
    if math.isnan(c.half_width):
        return f(estimate)
    low, high = (v * scale for v in c.interval)
    return f"{f(estimate)} [{f(low)}, {f(high)}]"


def claims_section(claims: list[Claim], index: Index) -> tuple[list[str], list[dict[str, Any]]]:
    """The report's Markdown lines for the claims, and one CSV row per setting."""
    md = ["## The reference study's claims", ""]
    if index.ambiguous:
        md += [
            "Left out (runs of one optimizer, batch size and smoothing under several labels): "
            + "; ".join(index.ambiguous)
            + ".",
            "",
        ]
    if not any(c.comparisons for c in claims):
        md += [
            "None can be tested on these runs: they need runs that differ only in optimizer "
            "(SGD, K-FAC), batch size or Mixup.",
            "",
        ]
        return md, []
    for rule in RULES:
        md += [rule, ""]
    rows = []
    for claim in claims:
        md += [f"### {claim.number}. {claim.statement}: **{claim.verdict}**", ""]
        md += [f"{claim.rule}.", ""]
        if claim.missing:
            md += [f"*Not tested: {claim.missing}.*", ""]
        if not claim.comparisons:
            continue
        notes = any(c.note for c in claim.comparisons)
        headers = ["setting", *claim.columns, "D [95% interval]", "verdict"]
        table = []
        for c in claim.comparisons:
            line = [c.setting, *c.cells, _interval_text(c, claim.scale), c.verdict]
            table.append(line + [c.note] if notes else line)
            low, high = c.interval
            rows.append(
                {
                    "claim": claim.number,
                    "statement": claim.statement,
                    "setting": c.setting,
                    "compared": " vs ".join(claim.columns),
                    "first": c.cells[0],
                    "second": c.cells[1],
                    "difference": c.estimate * claim.scale,
                    "low": low * claim.scale,
                    "high": high * claim.scale,
                    "verdict": c.verdict,
                    "note": c.note,
                }
            )
        md += [markdown_table(headers + (["note"] if notes else []), table), ""]
    return md, rows
