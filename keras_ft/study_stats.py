"""The figures of a study: intervals over seeds, paired differences, the
recommendation, the Markdown table and the plots (`keras_ft.study`).

Every figure is computed from the arms' own records (`metrics.json` of each
arm's workdir, plus its wall time and peak memory): nothing here runs a model.

An arm's interval is the 95% Student-t interval of its mean over seeds,
mean ± t(0.975, n-1) · s / √n. A paired difference against a reference arm
pairs the runs of the same seed (same split, same data order and head
initialisation), which removes the seed-to-seed variation both share.
"""

from __future__ import annotations

import math
import os

import numpy as np

# t(0.975, df) for df = 1..30; larger df use the normal quantile.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
NEAR = 0.01  # "within one point" of the best, for the cheapest-arm answer


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.960


def interval(values) -> dict:
    """Mean and 95% half-width (None with one value) of `values`."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    if not len(x):
        return {"mean": None, "half": None, "n": 0}
    half = None
    if len(x) > 1:
        half = float(t975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": float(x.mean()), "half": half, "n": int(len(x))}


def summarize(arms: list, records: dict, metric: str) -> list[dict]:
    """One summary per arm: `metric` and val_loss intervals, the paired
    difference against its reference arm, and mean costs.

    `records[(arm_name, seed)]` is a run's record (see `keras_ft.study`).
    """
    by_arm = {arm.name: {seed: r for (name, seed), r in records.items() if name == arm.name}
              for arm in arms}
    out = []
    for arm in arms:
        runs = by_arm[arm.name]
        ok = {s: r for s, r in runs.items() if r["status"] == "ok"}
        row = {
            "arm": arm.name, "group": arm.group, "x": arm.x, "reference": arm.reference,
            "describe": arm.describe,
            "seeds_ok": sorted(ok), "failed": {str(s): r["error"] for s, r in runs.items()
                                               if r["status"] != "ok"},
            metric: interval(r[metric] for r in ok.values()),
            "val_loss": interval(r["val_loss"] for r in ok.values()),
        }
        for cost in ("trainable_params", "train_seconds", "images_per_sec", "peak_rss_mb"):
            row[cost] = interval(r.get(cost) for r in ok.values())["mean"]
        ref = by_arm.get(arm.reference, {}) if arm.reference and arm.reference != arm.name else {}
        pairs = [ok[s][metric] - ref[s][metric] for s in sorted(ok)
                 if s in ref and ref[s]["status"] == "ok"]
        row["paired_diff"] = interval(pairs) if pairs else None
        out.append(row)
    return out


def recommend(rows: list[dict], metric: str) -> dict | None:
    """The best arm (and those inside its interval), and the cheapest arm
    (by training time) whose mean is within `NEAR` of the best's."""
    done = [r for r in rows if r[metric]["mean"] is not None]
    if not done:
        return None
    best = max(done, key=lambda r: r[metric]["mean"])
    b = best[metric]
    tied = [r["arm"] for r in done if r is not best and b["half"] is not None
            and r[metric]["mean"] >= b["mean"] - b["half"]]
    near = [r for r in done if r[metric]["mean"] >= b["mean"] - NEAR]
    timed = [r for r in near if r["train_seconds"]]
    cheapest = min(timed, key=lambda r: r["train_seconds"]) if timed else best
    ratio = (best["train_seconds"] / cheapest["train_seconds"]
             if best["train_seconds"] and cheapest["train_seconds"] else None)
    text = f"Best: {best['arm']} ({_pm(b)})"
    text += (f"; within its interval: {', '.join(tied)}." if tied else "; no other arm is within its interval.")
    if cheapest is best:
        text += " No cheaper arm is within one point of it."
    else:
        text += (f" Cheapest within one point: {cheapest['arm']} ({_pm(cheapest[metric])}), "
                 f"{ratio:.2g}x less training time than {best['arm']}.")
    return {"best": best["arm"], "tied": tied, "cheapest": cheapest["arm"],
            "time_ratio": ratio, "text": text}


def crossover(rows: list[dict], metric: str) -> dict | None:
    """The size study's answer: the smallest size at which scratch comes
    within `NEAR` of pretrained (paired), or None when it never does."""
    scratch = sorted((r for r in rows if r["group"] == "scratch" and r["paired_diff"]),
                     key=lambda r: r["x"])
    if not scratch:
        return None
    caught = [r for r in scratch if r["paired_diff"]["mean"] >= -NEAR]
    gaps = ", ".join(f"{r['x']:g}/class: {_pm(r['paired_diff'], sign=True)}" for r in scratch)
    if caught:
        text = (f"Scratch comes within one point of pretrained at {caught[0]['x']:g} images per "
                f"class (scratch - pretrained: {gaps}).")
    else:
        text = (f"Scratch does not catch up at any size tried, up to {scratch[-1]['x']:g} images "
                f"per class (scratch - pretrained: {gaps}).")
    return {"at": caught[0]["x"] if caught else None, "text": text}


def _pm(i: dict | None, sign: bool = False) -> str:
    if not i or i["mean"] is None:
        return "n/a"
    mean = f"{i['mean']:+.3f}" if sign else f"{i['mean']:.3f}"
    return mean if i["half"] is None else f"{mean} ± {i['half']:.3f}"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(rows: list[dict], metric: str) -> str:
    """The study's Markdown table, one row per arm."""
    lines = [
        f"| arm | {metric} (95% CI) | paired Δ vs reference | val_loss | trainable params "
        "| train s | images/s | peak RSS MB | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (f"{_pm(r['paired_diff'], sign=True)} vs {r['reference']}"
                if r["paired_diff"] else "reference" if r["reference"] == r["arm"] else "")
        seeds = f"{len(r['seeds_ok'])}" + (f" ({len(r['failed'])} failed)" if r["failed"] else "")
        lines.append(
            f"| {r['arm']} | {_pm(r[metric])} | {diff} | {_pm(r['val_loss'])} "
            f"| {_num(r['trainable_params'], ',.0f')} | {_num(r['train_seconds'], '.1f')} "
            f"| {_num(r['images_per_sec'], '.0f')} | {_num(r['peak_rss_mb'], '.0f')} | {seeds} |"
        )
    for r in rows:
        for seed, error in r["failed"].items():
            lines.append(f"\n{r['arm']} seed {seed} failed: {error}")
    return "\n".join(lines)


PLOTS = {  # study -> (file, x label, log x)
    "depth": ("params.png", "trainable parameters", True),
    "peft": ("params.png", "trainable parameters", True),
    "lr": ("lr.png", "learning rate", True),
    "scratch": ("scratch.png", "training steps", True),
    "size": ("size.png", "training images per class", True),
}


def plot(study: str, rows: list[dict], metric: str, directory: str, marks: dict | None = None) -> str | None:
    """The study's PNG: `metric` (mean, 95% CI bars) against its x (trainable
    parameters for depth/peft), one series per group; `marks` draws a
    labelled vertical line per group (the range test's suggestion)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    name, xlabel, logx = PLOTS[study]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = {}
    for r in rows:
        x = r["trainable_params"] if study in ("depth", "peft") else r["x"]
        if r[metric]["mean"] is None or not x:
            continue
        groups.setdefault(r["group"], []).append((x, r[metric]["mean"], r[metric]["half"] or 0, r["arm"]))
    for group, points in groups.items():
        points.sort()
        xs, ys, hs, labels = zip(*points)
        ax.errorbar(xs, ys, yerr=hs, marker="o", capsize=3, label=group or None,
                    linestyle="none" if study in ("depth", "peft") else "-")
        if study in ("depth", "peft"):
            for x, y, label in zip(xs, ys, labels):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for group, value in (marks or {}).items():
        ax.axvline(value, linestyle="--", color="gray")
        ax.annotate(f"suggestion ({group})", (value, ax.get_ylim()[0]), rotation=90, fontsize=8,
                    xytext=(3, 5), textcoords="offset points")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title(f"{study} study")
    ax.grid(alpha=0.3)
    if any(groups):
        ax.legend()
    path = os.path.join(directory, name if study not in ("depth", "peft") else f"{study}_{name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
