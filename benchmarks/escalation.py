"""Per-row escalation, measured: offline on held-out rows of real models, and served in simulation.

``offline``: for each model (the AV-Digits demo model, 20 epochs; the 6-epoch model behind the
committed profile; image_text), every validation row's and held-out row's confidence and score
under every configuration. The calibration, the signal and the chains come from the validation
rows only (exactly as ``mosel.profile`` would make them); every strategy of mosel's static
frontier and of the frontier with chains is then *selected* by the accuracy the planner credits
it (a static strategy: its validation accuracy; a chain: ``mosel.chains.credited``) and
*reported* on the held-out rows: accuracy, and mean device time per row from the profile's
tables (a chain's escalated rows Binomial at their held-out share, every later stage's overhead
counted), against every modality for every row and against the oracle (the cheapest correct
configuration per row). Beside it, a bound for any threshold rule: the cheapest chain, over every
cut, whose held-out accuracy is within 1 point (cuts chosen on the held-out rows themselves).
Printed as tables and curves; ``--plot`` writes an SVG.

``served``: AV-Digits in simulation (the committed profile's latency tables, residuals recorded
live), accuracies and calibration from the 6-epoch model's validation rows, held-out rows
replayed (``mosel.simulate(rows=...)``: each chain's rows escalate by their own confidences and
every job's accuracy is measured against labels). mosel with and without escalation, the
benchmark's floor (best - 0.06) and deadlines, Poisson arrivals; capacity at 1% misses and
correct answers on time.

``costs`` (goal 3): the executor's decision time (decisions.py's loop) with escalation on and
off on a synthetic calibrated profile, and ``model.infer``'s overhead when a chain runs and no
row escalates against escalation off (the voting model of the tests).

Run: python benchmarks/escalation.py offline --quick [--plot docs/img/escalation] (SVG, CSV, PNG with matplotlib) [--json out.json]
     python benchmarks/escalation.py served --quick [--json out.json]
     python benchmarks/escalation.py costs [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from scenarios import AV_DIGITS_PROFILE, CACHE, av_digits_model, scenario_named

import mosel
from mosel.calibrating import RowRecord, record_rows
from mosel.chains import later_parts, with_chains
from mosel.escalation import Calibration
from mosel.plan import ACCURACY_SCALE, CostModel, Strategy, build_plan
from mosel.profiles import cost_model_of

Z90 = 1.2815515655446004
BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8)
OVERHEAD_US: float | None = None
"""``--overhead-us``: every later stage's own overhead taken as this instead of measuring it here."""
Configuration = frozenset[str]
Overhead = float | dict[int, float]
"""A later stage's overhead: one figure, or per batch size."""


def top1(output: torch.Tensor, target: Any) -> torch.Tensor:
    return (output.argmax(-1) == torch.as_tensor(target)).double()


# ----------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Rows:
    """Per configuration: every row's score, and its confidence under each signal."""

    scores: dict[Configuration, np.ndarray]
    confidences: dict[str, dict[Configuration, np.ndarray]]

    @classmethod
    def of(cls, record: RowRecord) -> Rows:
        scores, confidences = record.arrays()
        return cls(scores, confidences)

    @property
    def n(self) -> int:
        return len(next(iter(self.scores.values())))


def av_digits_rows(model: torch.nn.Module, realisations: int) -> tuple[Rows, Rows]:
    """Validation rows from one half of the test images, held-out rows from the other half.

    Each half in ``realisations`` noise realisations with fresh pairings of clips (the validation
    and held-out rows share no image and no realisation).
    """
    from av_digits import data

    cached = (
        CACHE
        / f"escalation-rows-{sum(p.numel() for p in model.parameters())}-{float(sum(p.double().sum() for p in model.parameters())):.6f}-{realisations}.npz"
    )
    if cached.exists():
        return _load_rows(cached)
    order = np.random.default_rng(2024).permutation(540)
    halves = (order[:270], order[270:])
    out = []
    for half, base in zip(halves, (1, 101)):
        batches = []
        for r in range(realisations):
            split = data.load("test", realisation=base + r, images=half)
            batches += split.batches(90)
        out.append(Rows.of(record_rows(model, batches, top1)))
    _save_rows(cached, out[0], out[1])
    return out[0], out[1]


def _save_rows(path: Path, *parts: Rows) -> None:
    """Rows of validation and held-out halves in one .npz (numbers only; keys name part, kind, configuration)."""
    arrays = {}
    for i, rows in enumerate(parts):
        for c, a in rows.scores.items():
            arrays[f"{i}|score||{'+'.join(sorted(c))}"] = a
        for signal, by in rows.confidences.items():
            for c, a in by.items():
                arrays[f"{i}|confidence|{signal}|{'+'.join(sorted(c))}"] = a
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _load_rows(path: Path) -> tuple[Rows, Rows]:
    parts: list[Rows] = [Rows({}, {}), Rows({}, {})]
    with np.load(path) as data:
        for key in data.files:
            i, kind, signal, config = key.split("|")
            c = frozenset(config.split("+"))
            if kind == "score":
                parts[int(i)].scores[c] = data[key]
            else:
                parts[int(i)].confidences.setdefault(signal, {})[c] = data[key]
    return parts[0], parts[1]


def image_text_rows(model: torch.nn.Module, quick: bool) -> tuple[Rows, Rows]:
    import image_text

    validation = image_text.make_split(2000 if quick else 4000, seed=2)
    held_out = image_text.make_split(2000 if quick else 4000, seed=3)
    return tuple(  # type: ignore[return-value]
        Rows.of(record_rows(model, list(image_text.batches(*split, size=100)), top1))
        for split in (validation, held_out)
    )


# ----------------------------------------------------------------------------------------------- costs


def _expected_later(
    cost: CostModel, n: int, share: float, lower: Configuration, upper: Configuration, overhead: float
) -> float:
    """E over k ~ Binomial(n, share) of one later stage's cost (µs), its overhead when k > 0."""
    total = 0.0
    for k in range(1, n + 1):
        p = math.comb(n, k) * share**k * (1 - share) ** (n - k)
        if p < 1e-12:
            continue
        total += p * sum(later_parts(cost, [{(lower, upper): float(k)}], overhead).values())
    return total


def evaluate(
    strategy: Strategy, rows: Rows, signal: str, cost: CostModel, overhead: float
) -> tuple[float, float]:
    """(accuracy, mean device µs per row) of ``strategy`` on ``rows`` at its job size (``overhead``: that size's)."""
    n = strategy.n
    chain = strategy.chain
    if chain is None:
        accuracy = sum(float(rows.scores[c].mean()) * k for c, k in strategy.groups) / n
        return accuracy, cost.latency_us(strategy.groups) / n
    at = np.zeros(rows.n, dtype=np.int64)
    shares = []
    for t in range(len(chain.stages) - 1):
        level = np.searchsorted(chain.edges[t], rows.confidences[signal][chain.stages[t]], side="right")
        going = (at == t) & (level < chain.cuts[t])
        at[going] = t + 1
        shares.append(float(going.mean()))
    final = np.stack([rows.scores[c] for c in chain.stages])[at, np.arange(rows.n)]
    total = float(cost.latency_us(((chain.first, n),)))
    for t, share in enumerate(shares):
        total += _expected_later(cost, n, share, chain.stages[t], chain.stages[t + 1], overhead)
    return float(final.mean()), total / n


def oracle_cost(rows: Rows, cost: CostModel, n: int, target: float) -> float:
    """Mean µs per row of the cheapest correct configuration per row, giving up the dearest rows down to ``target``."""
    configs = sorted(rows.scores, key=lambda c: cost.latency_us(((c, n),)))
    per = np.array([cost.latency_us(((c, n),)) / n for c in configs])
    right = np.stack([rows.scores[c] >= 0.5 for c in configs])  # (C, N)
    cheapest_right = np.where(right.any(0), per[np.argmax(right, axis=0)], per[0])
    correct = right.any(0)
    extra = np.where(correct, cheapest_right - per[0], 0.0)
    order = np.argsort(-extra)  # give up the dearest correct rows first
    keep = correct.copy()
    accuracy = correct.mean()
    for i in order:
        if accuracy - 1.0 / rows.n < target or not keep[i]:
            break
        keep[i] = False
        accuracy -= 1.0 / rows.n
    return float(np.where(keep, cheapest_right, per[0]).mean())


# ----------------------------------------------------------------------------------------------- offline


def offline_model(
    model: torch.nn.Module, validation: Rows, held_out: Rows, base: mosel.Profile, overhead: Overhead
) -> dict[str, Any]:
    """The offline comparison of one model at job sizes 1 and 8."""
    modalities = base.modalities
    everything = frozenset(modalities)
    record = RowRecord(mosel.spec_of(model))
    ranking = {
        s: statistics.fmean(
            _auroc(validation.confidences[s][c], validation.scores[c]) for c in validation.scores
        )
        for s in validation.confidences
    }
    signal = max(ranking, key=lambda s: (ranking[s], s == "max_probability"))
    del record
    calibration = Calibration.fit(
        signal, validation.confidences[signal], validation.scores, ranking=ranking
    ).with_overhead(overhead)
    accuracy = {c: calibration.accuracy(c) for c in validation.scores}
    cost = cost_model_of(modalities, base.branch_latency, base.fusion_latency, accuracy)
    started = time.perf_counter()
    static = build_plan(cost)
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    chained = with_chains(static, cost, calibration, Z90)
    chain_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "signal": signal, "ranking": ranking, "validation_rows": validation.n, "held_out_rows": held_out.n,
        "stage_overhead_us": _overheads(calibration), "plan_s": plan_s, "chains_s": chain_s, "sizes": {},
    }  # fmt: skip
    for n in (1, 8):
        full_us = cost.latency_us(((everything, n),)) / n
        curves = {}
        for label, plan in (("static", static), ("escalation", chained)):
            points = []
            for s in plan.frontier(everything, n).strategies:
                v_acc, v_us = evaluate(s, validation, signal, cost, calibration.overhead_us(n))
                h_acc, h_us = evaluate(s, held_out, signal, cost, calibration.overhead_us(n))
                points.append({
                    "strategy": s.chain.describe(modalities) if s.chain else " + ".join(f"{k}x{base.key(c)}" for c, k in s.groups),
                    "v_acc": v_acc, "v_cost": v_us / full_us, "h_acc": h_acc, "h_cost": h_us / full_us,
                    "c_acc": s.accuracy_units / (n * ACCURACY_SCALE),
                })  # fmt: skip
            curves[label] = points
        v_all = float(validation.scores[everything].mean())
        h_all = float(held_out.scores[everything].mean())
        at_target = {}
        for label, points in curves.items():
            fitting = [p for p in points if p["c_acc"] >= v_all - 0.01]
            best = min(fitting, key=lambda p: p["v_cost"]) if fitting else None
            at_target[label] = best and {
                "strategy": best["strategy"], "h_cost": best["h_cost"], "h_acc_minus_all": best["h_acc"] - h_all,
                "v_cost": best["v_cost"],
            }  # fmt: skip
        gains = {}
        for budget in BUDGETS:
            picked = {}
            for label, points in curves.items():
                fitting = [p for p in points if p["v_cost"] <= budget]
                picked[label] = max(fitting, key=lambda p: p["c_acc"]) if fitting else None
            if picked["static"] and picked["escalation"]:
                gains[f"{budget:g}"] = {
                    "gain_pts": 100 * (picked["escalation"]["h_acc"] - picked["static"]["h_acc"]),
                    "escalation": picked["escalation"]["strategy"], "static": picked["static"]["strategy"],
                    "h_cost_escalation": picked["escalation"]["h_cost"], "h_cost_static": picked["static"]["h_cost"],
                }  # fmt: skip
        out["sizes"][str(n)] = {
            "all_modality_acc": {"validation": v_all, "held_out": h_all},
            "at_all_minus_1pt": at_target,
            "hindsight": hindsight(calibration, cost, held_out, signal, n, h_all - 0.01, full_us, modalities),
            "oracle_cost": oracle_cost(held_out, cost, n, h_all - 0.01) / full_us,
            "gains": gains,
            "curves": curves,
        }
    return out


def hindsight(
    calibration: Calibration,
    cost: CostModel,
    held_out: Rows,
    signal: str,
    n: int,
    target: float,
    full_us: float,
    modalities: tuple[str, ...],
) -> dict[str, Any] | None:
    """The cheapest chain of any cuts whose *held-out* accuracy reaches ``target`` (None: none does).

    A bound, not a result: the cuts are chosen on the held-out rows themselves, so no rule that
    sets thresholds on the validation rows' bins of this signal can do better.
    """
    from mosel.chains import _chain, _families

    best: dict[str, Any] | None = None
    for family in _families(calibration, cost.configurations(frozenset(modalities))):
        for row in range(len(family.accuracy)):
            chain = _chain(calibration, family, row)
            strategy = Strategy(((chain.first, n),), 0, 0, chain=chain)
            h_acc, h_us = evaluate(strategy, held_out, signal, cost, calibration.overhead_us(n))
            if h_acc >= target and (best is None or h_us / full_us < best["h_cost"]):
                best = {
                    "h_cost": h_us / full_us,
                    "h_acc_minus_all": h_acc - target - 0.01,
                    "strategy": chain.describe(modalities),
                }
    return best


def _auroc(confidence: np.ndarray, score: np.ndarray) -> float:
    from mosel.escalation import ranking_score

    return ranking_score(confidence, score)


def _overheads(calibration: Calibration) -> dict[str, float]:
    """The calibration's stage overhead per batch size, for printing and JSON ("all": one figure)."""
    table = calibration.stage_overhead_by_rows
    return {str(n): us for n, us in table} if table else {"all": calibration.stage_overhead_us}


def build_models(quick: bool) -> list[tuple[str, torch.nn.Module, Rows, Rows, mosel.Profile, Overhead]]:
    """The three models, their rows, their latency tables and their measured stage overhead."""
    from mosel.calibrating import _stage_overhead

    torch.set_num_threads(1)
    committed = mosel.Profile.load(AV_DIGITS_PROFILE)
    out = []
    realisations = 4 if quick else 8
    for epochs, label in (
        (20, "av-digits demo model (20 epochs)"),
        (6, "av-digits benchmark model (6 epochs)"),
    ):
        built = av_digits_model(epochs=epochs, profile=False)
        if built is None:
            print("espeak-ng missing: AV-Digits skipped")
            continue
        model = built[0].eval()
        validation, held_out = av_digits_rows(model, realisations)
        overhead = OVERHEAD_US if OVERHEAD_US is not None else _overhead(model, validation, committed)
        out.append((label, model, validation, held_out, committed, overhead))
    import image_text

    weights = CACHE / "image-text.pt"
    torch.manual_seed(0)
    if weights.exists():
        model = image_text.ImageText()
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        model = image_text.ImageText()
        inputs, labels = image_text.make_split(3000, seed=1)
        mosel.train_with_modality_dropout(
            model, lambda: image_text.batches(inputs, labels, 64), epochs=12, drop_probability=0.5
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
    model.eval()
    validation, held_out = image_text_rows(model, quick)
    inputs, labels = image_text.make_split(1000, seed=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default", mosel.MoselWarning)  # shown, not fatal
        profile = mosel.profile(
            model, image_text.batches(inputs, labels), max_batch_size=16, batch_sizes=[1, 2, 4, 8, 16],
            repeats=5, threads=1, progress=False,
        )  # fmt: skip
    overhead: Overhead = OVERHEAD_US if OVERHEAD_US is not None else 0.0
    if OVERHEAD_US is None and profile.calibration is not None:
        overhead = dict(profile.calibration.stage_overhead_by_rows) or profile.calibration.stage_overhead_us
    mosel.close(model)
    del _stage_overhead
    out.append(("image_text", model, validation, held_out, profile, overhead))
    return out


def _overhead(model: torch.nn.Module, rows: Rows, profile: mosel.Profile) -> dict[int, float]:
    """What one later stage costs besides its branches and fusion here (µs, median per batch size)."""
    from av_digits import data

    from mosel.calibrating import _stage_overhead

    calibration = Calibration.fit("max_probability", rows.confidences["max_probability"], rows.scores)
    sample = data.load("test").inputs(slice(0, profile.max_batch_size))
    return _stage_overhead(
        model, mosel.spec_of(model), calibration, sample, profile.max_batch_size, profile.cost_model()
    )


def print_offline(results: dict[str, Any]) -> None:
    for name, r in results.items():
        print(
            f"\n## {name}: signal {r['signal']} (ranking {', '.join(f'{k} {v:.3f}' for k, v in r['ranking'].items())}), "
            f"{r['validation_rows']} validation / {r['held_out_rows']} held-out rows, stage overhead {', '.join(f'{us:.0f} us at {k}' for k, us in r['stage_overhead_us'].items())}, "
            f"plan {r['plan_s']:.2f} s + chains {r['chains_s']:.3f} s"
        )
        for n, size in r["sizes"].items():
            acc = size["all_modality_acc"]
            print(
                f"batch {n}: all-modality accuracy {acc['validation']:.4f} (validation) / {acc['held_out']:.4f} (held out); "
                f"oracle at all - 1 pt: {size['oracle_cost']:.0%} of all-modality"
            )
            for label, hit in size["at_all_minus_1pt"].items():
                if hit:
                    print(
                        f"  at all-modality - 1 pt, {label:<10}: {hit['h_cost']:.1%} of all-modality device time "
                        f"(held out; {hit['v_cost']:.1%} validation), accuracy {100 * hit['h_acc_minus_all']:+.2f} pts vs all "
                        f"[{hit['strategy']}]"
                    )
            bound = size["hindsight"]
            if bound:
                print(
                    f"  at all-modality - 1 pt, cuts chosen on the held-out rows themselves (a bound for any "
                    f"threshold rule): {bound['h_cost']:.1%}, accuracy {100 * bound['h_acc_minus_all']:+.2f} pts vs all "
                    f"[{bound['strategy']}]"
                )
            for budget, g in size["gains"].items():
                print(
                    f"  at {budget}x cost: escalation {g['gain_pts']:+.2f} pts over static "
                    f"({g['h_cost_escalation']:.2f}x [{g['escalation']}] vs {g['h_cost_static']:.2f}x [{g['static']}])"
                )
            for label in ("static", "escalation"):
                pts = size["curves"][label]
                print(
                    f"  curve {label} (held-out cost x, accuracy): "
                    + ", ".join(
                        f"({p['h_cost']:.2f}, {p['h_acc']:.3f})" for p in pts[:: max(1, len(pts) // 12)]
                    )
                )


def svg_plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against device time (held-out rows, batch 8), static against escalation, per model."""
    width, height, pad = 330, 260, 45
    panels = []
    for i, (name, r) in enumerate(results.items()):
        size = r["sizes"]["8"]
        x0 = i * (width + 20)
        every = [p for label in ("static", "escalation") for p in size["curves"][label]]
        lo = min(p["h_acc"] for p in every)
        hi = max(p["h_acc"] for p in every)

        def xy(cost: float, acc: float, x0: int = x0, lo: float = lo, hi: float = hi) -> str:
            return f"{x0 + pad + cost * (width - pad - 10):.1f},{height - pad - (acc - lo) / max(hi - lo, 1e-9) * (height - pad - 25):.1f}"

        body = [
            f'<text x="{x0 + pad}" y="15" font-size="11">{name} (batch 8)</text>',
            f'<line x1="{x0 + pad}" y1="{height - pad}" x2="{x0 + width - 10}" y2="{height - pad}" stroke="black"/>',
            f'<line x1="{x0 + pad}" y1="{height - pad}" x2="{x0 + pad}" y2="20" stroke="black"/>',
            f'<text x="{x0 + pad}" y="{height - 15}" font-size="10">device time / all-modality (0 to 1)</text>',
            f'<text x="{x0 + 2}" y="30" font-size="10">{hi:.2f}</text><text x="{x0 + 2}" y="{height - pad}" font-size="10">{lo:.2f}</text>',
        ]
        for label, colour in (("static", "#1f77b4"), ("escalation", "#d62728")):
            pts = sorted(size["curves"][label], key=lambda p: p["h_cost"])
            body.append(
                f'<polyline fill="none" stroke="{colour}" points="{" ".join(xy(p["h_cost"], p["h_acc"]) for p in pts)}"/>'
            )
        body.append(
            f'<text x="{x0 + width - 120}" y="{height - pad - 10}" font-size="10" fill="#1f77b4">static (mosel today)</text>'
        )
        body.append(
            f'<text x="{x0 + width - 120}" y="{height - pad - 22}" font-size="10" fill="#d62728">with escalation</text>'
        )
        panels.append("\n".join(body))
    total = len(results) * (width + 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}">\n'
        + "\n".join(panels)
        + "\n</svg>\n"
    )


def write_csv(results: dict[str, Any], path: Path) -> None:
    """Every curve point: model, batch, static/escalation, strategy, validation and held-out figures."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["model", "batch", "frontier", "strategy", "v_cost", "v_acc", "h_cost", "h_acc"])
        for name, r in results.items():
            for n, size in r["sizes"].items():
                for label, points in size["curves"].items():
                    for p in points:
                        out.writerow([name, n, label, p["strategy"], f"{p['v_cost']:.5f}", f"{p['v_acc']:.5f}",
                                      f"{p['h_cost']:.5f}", f"{p['h_acc']:.5f}"])  # fmt: skip


def matplotlib_plot(results: dict[str, Any], path: Path) -> bool:
    """The curves as a PNG when matplotlib is installed; False when it is not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        for label, colour in (("static", "tab:blue"), ("escalation", "tab:red")):
            pts = sorted(r["sizes"]["8"]["curves"][label], key=lambda p: p["h_cost"])
            ax.plot(
                [p["h_cost"] for p in pts], [p["h_acc"] for p in pts], "o-", ms=2, color=colour, label=label
            )
        ax.set(title=f"{name} (batch 8)", xlabel="device time / all-modality", ylabel="held-out accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))
    return True


def offline(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name, model, validation, held_out, base, overhead in build_models(args.quick):
        results[name] = offline_model(model, validation, held_out, base, overhead)
    print_offline(results)
    if args.plot:
        path = Path(args.plot)
        svg_plot(results, path.with_suffix(".svg"))
        if not matplotlib_plot(results, path):
            print(f"matplotlib is not installed: {path.with_suffix('.svg')} (SVG) and the CSV only")
        write_csv(results, path.with_suffix(".csv"))
    return results


# ----------------------------------------------------------------------------------------------- served


def served_profile(quick: bool) -> tuple[mosel.Profile, mosel.RowSample, dict[str, float]]:
    """The committed AV-Digits latencies with the 6-epoch model's accuracies and calibration."""
    built = av_digits_model(epochs=6, profile=False)
    assert built is not None
    model = built[0].eval()
    torch.set_num_threads(1)
    validation, held_out = av_digits_rows(model, 4 if quick else 8)
    committed = mosel.Profile.load(AV_DIGITS_PROFILE)
    overhead = OVERHEAD_US if OVERHEAD_US is not None else _overhead(model, validation, committed)
    signal = max(("max_probability", "margin"), key=lambda s: statistics.fmean(
        _auroc(validation.confidences[s][c], validation.scores[c]) for c in validation.scores))  # fmt: skip
    calibration = Calibration.fit(signal, validation.confidences[signal], validation.scores).with_overhead(
        overhead
    )
    accuracy = {c: calibration.accuracy(c) for c in validation.scores}
    cost = cost_model_of(committed.modalities, committed.branch_latency, committed.fusion_latency, accuracy)
    from types import MappingProxyType

    profile = dataclasses.replace(
        committed,
        accuracy=MappingProxyType(accuracy),
        sample_count=validation.n,
        plan=build_plan(cost),
        calibration=calibration,
    )
    sample = mosel.RowSample(
        MappingProxyType(held_out.confidences[signal]), MappingProxyType(held_out.scores)
    )
    return profile, sample, _overheads(calibration)


def served(args: argparse.Namespace) -> dict[str, Any]:
    from common import capacity
    from conditions import CONDITIONS, arrivals_for, rate_per_s

    profile, sample, overhead = served_profile(args.quick)
    print("stage overhead " + ", ".join(f"{us:.0f} us at {n}" for n, us in overhead.items()), flush=True)
    scenario = scenario_named("av-digits")
    conditions = CONDITIONS["strict"]
    drop = scenario.drop
    floor = round(max(profile.accuracy.values()) - drop, 4)
    loads = (0.125, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
    seeds = range(3 if args.quick else 5)
    jobs = 800 if args.quick else 2000
    variants = {"mosel": mosel.SchedulerConfig(escalation=False, miss_budget=0.01),
                "mosel+escalation": mosel.SchedulerConfig(miss_budget=0.01)}  # fmt: skip
    grid: dict[tuple[str, float, int], dict[str, float]] = {}
    for load in loads:
        for seed in seeds:
            seconds = jobs / rate_per_s(profile, load)
            arrivals = arrivals_for(
                profile, conditions, load, seconds, seed, slack_ms=scenario.slack_ms, drop=drop
            )
            for label, config in variants.items():
                started = time.perf_counter()
                sim = mosel.simulate(
                    profile, arrivals, config, residuals=scenario.residuals, seed=seed, rows=sample
                )
                requests = sum(r.arrival.n for r in sim.records)
                on_time = [r for r in sim.records if r.on_time]
                served_ = [r for r in sim.records if r.served]
                correct = sum(r.measured_accuracy * r.arrival.n for r in on_time)
                grid[(label, load, seed)] = {
                    "violation": 1 - sum(r.arrival.n for r in on_time) / requests,
                    "correct_rps": correct / seconds,
                    "measured_accuracy": sum(r.measured_accuracy * r.arrival.n for r in served_)
                    / max(1, sum(r.arrival.n for r in served_)),
                    "expected_accuracy": sum(r.expected_accuracy * r.arrival.n for r in served_)
                    / max(1, sum(r.arrival.n for r in served_)),
                    "escalated": sum(sum(r.escalated) for r in served_)
                    / max(1, sum(r.arrival.n for r in served_)),
                    "decision_p99_ms": float(np.percentile(sim.decision_ms, 99)) if sim.decision_ms else 0.0,
                    "wall_s": time.perf_counter() - started,
                }
        print(f"load {load}: " + " | ".join(
            f"{label}: viol {statistics.median(grid[(label, load, s)]['violation'] for s in seeds):.3%} "
            f"correct/s {statistics.median(grid[(label, load, s)]['correct_rps'] for s in seeds):.1f} "
            f"acc {statistics.median(grid[(label, load, s)]['measured_accuracy'] for s in seeds):.4f} "
            f"(exp {statistics.median(grid[(label, load, s)]['expected_accuracy'] for s in seeds):.4f}) "
            f"esc {statistics.median(grid[(label, load, s)]['escalated'] for s in seeds):.2f}"
            for label in variants
        ), flush=True)  # fmt: skip
    out: dict[str, Any] = {
        "floor": floor,
        "stage_overhead_us": overhead,
        "loads": list(loads),
        "capacity": {},
        "by_load": {},
    }
    for label in variants:
        caps = [
            capacity(list(loads), [grid[(label, load, s)]["violation"] for load in loads], 0.01)
            for s in seeds
        ]
        out["capacity"][label] = statistics.median(caps)
        out["by_load"][label] = {
            f"{load:g}": {
                k: statistics.median(grid[(label, load, s)][k] for s in seeds) for k in grid[(label, load, 0)]
            }
            for load in loads
        }
    for target in (0.01, 0.05):
        per_seed = {
            label: [
                capacity(list(loads), [grid[(label, load, s)]["violation"] for load in loads], target)
                for s in seeds
            ]
            for label in variants
        }
        ratios = [
            e / b if b > 0 else math.nan for b, e in zip(per_seed["mosel"], per_seed["mosel+escalation"])
        ]
        out[f"capacity_per_seed_{target:g}"] = per_seed
        base, esc = statistics.median(per_seed["mosel"]), statistics.median(per_seed["mosel+escalation"])
        print(f"floor {floor}; capacity at {target:.0%} misses (median of {len(seeds)} seeds): mosel {base:.3f} "
              f"(seeds {min(per_seed['mosel']):.3f}-{max(per_seed['mosel']):.3f}), with escalation {esc:.3f} "
              f"(seeds {min(per_seed['mosel+escalation']):.3f}-{max(per_seed['mosel+escalation']):.3f}); "
              f"ratio per seed {', '.join(f'{r:.2f}x' for r in ratios)}")  # fmt: skip
    out["correct_ratio"] = {}
    for load in loads:
        per = [
            grid[("mosel+escalation", load, s)]["correct_rps"] / grid[("mosel", load, s)]["correct_rps"]
            for s in seeds
        ]
        acc = [grid[("mosel+escalation", load, s)]["measured_accuracy"] for s in seeds]
        out["correct_ratio"][f"{load:g}"] = {
            "median": statistics.median(per),
            "min": min(per),
            "max": max(per),
        }
        print(f"  load {load:g}: correct answers on time {statistics.median(per):.3f}x (seeds {min(per):.3f}-{max(per):.3f}); "
              f"measured accuracy with escalation {min(acc):.4f}-{max(acc):.4f} against floor {floor}")  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- costs


def synthetic_calibrated(m: int, max_batch: int, rows: int = 4000, seed: int = 0) -> mosel.Profile:
    """decisions.py's synthetic profile with a calibration of synthetic rows (richer: more accurate).

    Each row has a difficulty; a configuration's confidence falls and its chance of being right
    falls with it, less so the more modalities it has: escalation has rows to find.
    """
    from decisions import profile_for

    base = profile_for(m, max_batch)
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.0, 1.0, rows)
    confidences, scores = {}, {}
    for c in base.accuracy:
        skill = 0.35 + 0.25 * len(c) + 0.05 * rng.uniform()
        margin = skill - difficulty + rng.normal(0.0, 0.15, rows)
        confidences[c] = 1.0 / (1.0 + np.exp(-6.0 * margin))
        scores[c] = (rng.uniform(0.0, 1.0, rows) < 1.0 / (1.0 + np.exp(-8.0 * margin))).astype(np.float64)
    calibration = Calibration.fit("max_probability", confidences, scores).with_overhead(30.0)
    accuracy = {c: calibration.accuracy(c) for c in base.accuracy}
    cost = cost_model_of(base.modalities, base.branch_latency, base.fusion_latency, accuracy)
    from types import MappingProxyType

    return dataclasses.replace(
        base,
        accuracy=MappingProxyType(accuracy),
        sample_count=rows,
        plan=build_plan(cost),
        calibration=calibration,
    )


def decision_costs(iterations: int) -> list[dict[str, Any]]:
    """decisions.py's executor wait (complete + dispatch) with escalation on and off, same queues."""
    from decisions import decision_times

    out = []
    for m, top in ((3, 32), (4, 8)):
        profile = synthetic_calibrated(m, top)
        for length in (1, 16, 64):
            for label, escalation in (("off", False), ("on", True)):
                r = decision_times(
                    profile, length, iterations, config=mosel.SchedulerConfig(escalation=escalation)
                )
                out.append({"modalities": m, "max_batch": top, "queue": length, "escalation": label,
                            "wait_p50_ms": r["wait_p50_ms"], "wait_p99_ms": r["wait_p99_ms"]})  # fmt: skip
                print(f"{m} modalities, {length} queued, escalation {label}: executor wait p50 "
                      f"{r['wait_p50_ms']} ms, p99 {r['wait_p99_ms']} ms", flush=True)  # fmt: skip
    return out


def infer_costs(repeats: int) -> list[dict[str, Any]]:
    """What escalation adds to a call when no row escalates (the voting model of the tests).

    1. ``model.infer`` with no SLO (every modality, static) on two copies calibrated alike, one
       attached with escalation on and one with ``SchedulerConfig(escalation=False)``: each call's
       overhead over the same work by hand (branches and fusion), interleaved, medians.
    2. A batch whose rows all run a chain and none escalates (rows so clear-cut that every
       confidence is in the top bin), through the executor's own path (``run_chained``), against
       the same batch with no chain (the same call, static rows): the confidence read and the
       decision.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from overhead import interleaved

    from mosel.execution import Later, run_chained
    from mosel.plan import Strategy
    from tests.unit.votes import CLASSES, Votes, votes_profile

    torch.set_num_threads(1)
    out = []
    on, off = Votes().eval(), Votes().eval()
    profile = votes_profile(on)
    assert profile.calibration is not None
    mosel.attach(on, profile)
    mosel.attach(off, profile, scheduler=mosel.SchedulerConfig(escalation=False))
    spec = mosel.spec_of(on)
    everything = frozenset(spec.modalities)
    chain = next(
        s.chain for f in with_chains(profile.plan, profile.cost_model(), profile.calibration, Z90).frontiers.values()
        for s in f.strategies if s.chain is not None and len(s.chain.stages) == 2
    )  # fmt: skip
    try:
        for n in (1, 8):
            labels = torch.arange(n) % CLASSES
            clear = {m: torch.nn.functional.one_hot(labels, CLASSES).float() * 30.0 for m in spec.modalities}

            def by_hand(clear: dict[str, torch.Tensor] = clear) -> object:
                return on.fuse({m: getattr(on, f"encode_{m}")(x) for m, x in clear.items()})

            def served_on(clear: dict[str, torch.Tensor] = clear) -> mosel.Result:
                return on.infer(clear)  # type: ignore[attr-defined,no-any-return]

            def served_off(clear: dict[str, torch.Tensor] = clear) -> mosel.Result:
                return off.infer(clear)  # type: ignore[attr-defined,no-any-return]

            later = Later(profile.calibration.signal)
            first = Strategy(((chain.first, n),), 0, 0)

            chained, static = (
                functools.partial(run_chained, on, spec, first, chains, clear, later)
                for chains in ([chain] * n, [None] * n)
            )

            assert not any(chained().escalated)  # type: ignore[attr-defined]
            assert served_on().modalities[0] == everything
            with torch.inference_mode():
                hand_a, infer_on = interleaved(by_hand, served_on, repeats)
                hand_b, infer_off = interleaved(by_hand, served_off, repeats)
                with_chain, without = interleaved(chained, static, repeats)
            row = {
                "batch": n, "by_hand_us": round((hand_a + hand_b) / 2, 1),
                "infer_on_us": round(infer_on, 1), "infer_off_us": round(infer_off, 1),
                "overhead_on_us": round(infer_on - hand_a, 1), "overhead_off_us": round(infer_off - hand_b, 1),
                "chain": chain.describe(spec.modalities),
                "batch_with_chain_us": round(with_chain, 1), "batch_static_us": round(without, 1),
            }  # fmt: skip
            row["overhead_ratio"] = round(row["overhead_on_us"] / row["overhead_off_us"], 3)
            row["chain_extra_us"] = round(with_chain - without, 1)
            out.append(row)
            print(f"batch {n}: by hand {row['by_hand_us']} us; infer with escalation on {infer_on:.1f} us "
                  f"(overhead {row['overhead_on_us']} us), off {infer_off:.1f} us (overhead {row['overhead_off_us']} us): "
                  f"{row['overhead_ratio']:.2f}x; a batch whose rows run [{row['chain']}] and none escalates: "
                  f"{with_chain:.1f} us against {without:.1f} us static (+{row['chain_extra_us']} us)", flush=True)  # fmt: skip
    finally:
        mosel.close(on)
        mosel.close(off)
    return out


def costs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "decisions": decision_costs(200 if args.quick else 400),
        "infer": infer_costs(100 if args.quick else 300),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("offline", "served", "costs"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot")
    parser.add_argument("--json")
    parser.add_argument(
        "--overhead-us",
        type=float,
        help="a later stage's own overhead (µs) instead of measuring it (sensitivity)",
    )
    args = parser.parse_args()
    global OVERHEAD_US  # noqa: PLW0603
    OVERHEAD_US = args.overhead_us
    started = time.perf_counter()
    result = {"offline": offline, "served": served, "costs": costs}[args.mode](args)
    print(f"\n{args.mode} took {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
