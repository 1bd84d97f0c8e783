"""The study report: budget-matched iso-accuracy speedups with intervals, a FLOP ledger.

A study runs each method at several budgets (training steps), each run with its own
full learning-rate schedule, over paired seeds. From every run's *final* evaluation:
- accuracy curves over budgets (zero-shot top-1, balanced per-class, retrieval R@1);
- speedups in examples and FLOPs (all-in, and with the reference amortised) to reach
  uniform's seed-mean accuracy at its largest budget, interpolated along each method's
  budget curve (jest_curate/study_stats.py says how), with bootstrap 95% intervals;
- paired accuracy differences to uniform at every budget, with intervals; "not
  significant" wherever an interval includes the null value (0, or 1 for a speedup);
- the FLOP ledger per method and budget (jest_curate/ledger.py), and the share of each
  noise kind among selected examples.

`render_table` also renders the first committed studies' summaries (results/*), which
used a mid-run checkpoint rule; those carry no "format" key.
"""
import dataclasses
import os
import textwrap
from typing import Optional

import numpy as np
import pyarrow as pa

from jest_curate import formats
from jest_curate import ledger as ledger_lib
from jest_curate import study_stats

__all__ = ["FORMAT", "selection_diagnostics", "final_metrics", "study_summary",
           "write_report", "render_table"]

FORMAT = "jest-curate/study/v2"
METRIC = "zeroshot_top1"
BASELINE = "uniform"


# Noise kinds reported separately: (name, ground-truth column, values).
NOISE_CATEGORIES = (("mismatched", "caption_kind", ("wrong_item",)),
                    ("boilerplate", "caption_kind", ("boilerplate",)),
                    ("off_topic", "caption_kind", ("off_topic",)),
                    ("duplicate", "noise_kind", ("exact_duplicate", "near_duplicate")))


def _noise_flags(noise_dir: str) -> dict:
    """{uid: (noisy caption, category flags...)} from the demo's ground truth.

    A v1 ground truth (no caption_kind) read its duplicates as noisy whatever their
    caption; the categories then fall back to noise_kind.
    """
    table = pa.concat_tables(formats.read_shard(s) for s in formats.list_shards(noise_dir))
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    columns.setdefault("caption_kind", columns["noise_kind"])
    flags = [columns["noisy"]] + [[v in values for v in columns[col]]
                                  for _, col, values in NOISE_CATEGORIES]
    return dict(zip(columns["uid"], zip(*flags)))


def selection_diagnostics(run_dir: str, noise_dir: Optional[str]) -> list:
    """Per round: noisy share of selected examples (overall and per noise category, see
    NOISE_CATEGORIES) and learnability selected vs rejected."""
    noisy = _noise_flags(noise_dir) if noise_dir else None
    rows = []
    rounds_dir = os.path.join(run_dir, "rounds")
    for name in sorted(os.listdir(rounds_dir)):
        manifest = os.path.join(rounds_dir, name, "selection", "manifest")
        if not os.path.isdir(manifest):
            continue
        m = pa.concat_tables(formats.read_shard(s) for s in formats.list_shards(manifest))
        decided = m.filter(pa.compute.is_in(m.column("reason"),
                                            value_set=pa.array(["selected", "rejected"])))
        sel = decided.column("selected").to_numpy(zero_copy_only=False)
        uids = decided.column("uid").to_pylist()
        row = {"round": int(name[1:])}
        if noisy is not None:
            none = (False,) * (1 + len(NOISE_CATEGORIES))
            flags = np.array([noisy.get(u, none) for u in uids], bool).reshape(len(uids), -1)
            for j, name in enumerate(["noisy"] + [c[0] for c in NOISE_CATEGORIES]):
                row[f"{name}_share_selected"] = float(flags[sel, j].mean()) if sel.any() \
                    else None
                row[f"{name}_share_candidates"] = float(flags[:, j].mean()) if len(uids) \
                    else None
        lrn = decided.column("learner_loss").to_numpy(zero_copy_only=False).astype(float)
        ref = decided.column("reference_loss").to_numpy(zero_copy_only=False).astype(float)
        learnability = lrn - ref
        if np.isfinite(learnability).any():
            row["learnability_selected"] = float(np.nanmean(learnability[sel]))
            row["learnability_rejected"] = float(np.nanmean(learnability[~sel]))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- #
# Per run and per study
# --------------------------------------------------------------------------- #

def final_metrics(run_summary: dict) -> dict:
    """A run's last evaluation and its ledger at that round."""
    evaluated = [r for r in run_summary["rounds"] if r.get("eval")]
    if not evaluated:
        raise ValueError(f"run {run_summary.get('name')} has no evaluation")
    last = evaluated[-1]
    ev = last["eval"]
    r1 = [ev[k] for k in ("retrieval_image_to_text_r1", "retrieval_text_to_image_r1") if k in ev]
    entry = last.get("ledger") or ledger_lib.round_ledger(
        reference_training=0, reference_scoring=run_summary.get("reference_scoring_flops", 0),
        learner_scoring=last["scoring_flops_cumulative"]
        - run_summary.get("reference_scoring_flops", 0), selection=0,
        training=last["train_flops"])
    return {"flops_per_example": run_summary.get("flops_per_example", {}),
            "accuracy": ev[METRIC], "balanced": ev.get("zeroshot_balanced_top1"),
            "per_class": ev.get("zeroshot_top1_per_class"),
            "retrieval_r1": float(np.mean(r1)) if r1 else None,
            "examples": last["examples_seen"], "ledger": entry}


def _arrays(per_budget: dict) -> dict:
    """{budget: [final_metrics per seed]} -> arrays [budgets, seeds] and budget axes."""
    budgets = sorted(per_budget)
    seeds = {len(per_budget[b]) for b in budgets}
    if len(seeds) != 1:
        raise ValueError(f"every budget needs the same seeds, got counts {sorted(seeds)}")

    def grid(fn):
        return np.array([[fn(m) for m in per_budget[b]] for b in budgets], np.float64)
    return {"budgets": budgets, "accuracy": grid(lambda m: m["accuracy"]),
            "examples": grid(lambda m: m["examples"]).mean(axis=1),
            "all_in": grid(lambda m: m["ledger"]["all_in"]),
            "amortised": grid(lambda m: m["ledger"]["amortised"])}


def _speedups(arrays: dict, idx: np.ndarray) -> dict:
    """Iso-accuracy speedups of every method for the seeds `idx` (see study_stats)."""
    base = arrays[BASELINE]
    target = float(base["accuracy"][-1, idx].mean())
    out = {"target_accuracy": target}
    for m, a in arrays.items():
        crossing = study_stats.iso_accuracy_crossing(a["accuracy"][:, idx].mean(axis=1), target)
        row = {"status": crossing.status}
        for key, values, reference in (
                ("examples", a["examples"], base["examples"][-1]),
                ("flops_all_in", a["all_in"][:, idx].mean(axis=1), base["all_in"][-1, idx].mean()),
                ("flops_amortised", a["amortised"][:, idx].mean(axis=1),
                 base["amortised"][-1, idx].mean())):
            needed = study_stats.interpolate_at(values, crossing)
            row[f"{key}_needed"] = needed
            row[f"{key}_speedup"] = None if needed is None else float(reference / needed)
        out[m] = row
    return out


_SPEEDUP_KEYS = ("examples_speedup", "flops_all_in_speedup", "flops_amortised_speedup")


def study_summary(metrics: dict, *, num_resamples: int = 2000, seed: int = 0) -> dict:
    """metrics: {method: {budget_steps: [final_metrics per seed]}} (seeds paired).

    Returns the report's numbers: curves, ledgers, speedups and differences with
    bootstrap intervals (same resampled seeds for every method: paired).
    """
    if BASELINE not in metrics:
        raise ValueError("a study needs the uniform baseline")
    arrays = {m: _arrays(per_budget) for m, per_budget in metrics.items()}
    n = arrays[BASELINE]["accuracy"].shape[1]
    if any(a["accuracy"].shape[1] != n for a in arrays.values()):
        raise ValueError("every method needs the same seeds (they pair runs)")
    point = _speedups(arrays, np.arange(n))
    draws = study_stats.bootstrap_draws(n, num_resamples=num_resamples, seed=seed)
    replicates = None if draws is None else [_speedups(arrays, idx) for idx in draws]
    methods = {}
    for m, a in arrays.items():
        row = {"budgets": a["budgets"], "examples": a["examples"].tolist(),
               "accuracy_mean": a["accuracy"].mean(axis=1).tolist(),
               "accuracy_per_seed": a["accuracy"].tolist(),
               "accuracy_ci": [list(ci) if ci else None for ci in (
                   study_stats.bootstrap_interval(lambda idx, r=r: float(r[idx].mean()), n,
                                                  num_resamples=num_resamples, seed=seed)
                   for r in a["accuracy"])],
               "balanced_mean": _mean_of(metrics[m], a["budgets"], "balanced"),
               "retrieval_r1_mean": _mean_of(metrics[m], a["budgets"], "retrieval_r1"),
               "flops_all_in": a["all_in"].mean(axis=1).tolist(),
               "flops_amortised": a["amortised"].mean(axis=1).tolist(),
               "ledger": [{k: float(np.mean([s["ledger"][k] for s in metrics[m][b]]))
                           for k in ledger_lib.COMPONENTS + ("all_in", "amortised")}
                          for b in a["budgets"]],
               "per_class_largest": _per_class_mean(metrics[m][a["budgets"][-1]]),
               "flops_per_example": _flops_per_example(metrics[m][a["budgets"][-1]]),
               **point[m]}
        for key in _SPEEDUP_KEYS:  # An end not reached is None (see study_stats).
            ci = None if replicates is None else study_stats.speedup_interval(
                [r[m][key] for r in replicates])
            row[f"{key}_ci"] = list(ci) if ci else None
            row[f"{key}_significant"] = study_stats.excludes(ci, 1.0)
        base = arrays[BASELINE]
        row["difference_to_uniform"] = [
            {"budget": b, **study_stats.paired_difference(
                a["accuracy"][i], base["accuracy"][base["budgets"].index(b)],
                num_resamples=num_resamples, seed=seed)}
            for i, b in enumerate(a["budgets"]) if b in base["budgets"] and m != BASELINE]
        methods[m] = row
    return {"format": FORMAT, "num_seeds": n, "target_accuracy": point["target_accuracy"],
            "methods": methods, "amortised_assumption": ledger_lib.AMORTISED_ASSUMPTION}


def _mean_of(per_budget: dict, budgets: list, key: str) -> list:
    return [None if any(s[key] is None for s in per_budget[b])
            else float(np.mean([s[key] for s in per_budget[b]])) for b in budgets]


def _flops_per_example(runs: list) -> dict:
    """Measured FLOPs per example (training, learner and reference scoring), seed mean."""
    keys = set.intersection(*(set(r["flops_per_example"]) for r in runs)) if runs else set()
    return {k: float(np.mean([r["flops_per_example"][k] for r in runs])) for k in sorted(keys)}


def _per_class_mean(runs: list) -> Optional[dict]:
    if any(r["per_class"] is None for r in runs):
        return None
    names = list(runs[0]["per_class"])
    return {c: (None if any(r["per_class"][c] is None for r in runs)
                else float(np.mean([r["per_class"][c] for r in runs]))) for c in names}


# --------------------------------------------------------------------------- #
# Plots and the report directory
# --------------------------------------------------------------------------- #

def _plot(methods: dict, reference_acc: Optional[float], target: float, path: str,
          x_key: str, xlabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m, row in methods.items():
        x, y = np.asarray(row[x_key], float), np.asarray(row["accuracy_mean"], float)
        line, = ax.plot(x, y, marker="o", label=m)
        cis = row["accuracy_ci"]
        if all(ci is not None for ci in cis):
            lo, hi = np.array(cis, float).T
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(target, color="black", linestyle=":", label="uniform at its largest budget")
    if reference_acc is not None:
        ax.axhline(reference_acc, color="gray", linestyle="--", label="reference")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final zero-shot top-1 (seed mean, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_noise(noise: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [c[0] for c in NOISE_CATEGORIES]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(noise))
    for j, (m, shares) in enumerate(noise.items()):
        ax.bar(np.arange(len(kinds)) + j * width, [shares[k]["selected"] for k in kinds],
               width, label=m)
    if noise:
        first = next(iter(noise.values()))
        ax.scatter(np.arange(len(kinds)) + 0.4 - width / 2,
                   [first[k]["candidates"] for k in kinds], color="black", marker="_", s=400,
                   label="candidates")
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
    ax.set_ylabel("share of selected examples")
    ax.set_title("noise kinds selected (largest budget, seed mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(output: str, *, runs: dict, reference: dict, noise_dir: Optional[str],
                 settings: dict, num_resamples: int = 2000) -> dict:
    """runs: {method: {budget_steps: [run dirs, one per seed, seeds in one order]}}.

    `reference`: {"eval": its eval.json, "training_flops", ...}. Writes OUTPUT/summary.json,
    table.md, accuracy_vs_examples.png, accuracy_vs_flops.png, noise_kinds.png.
    """
    os.makedirs(output, exist_ok=True)
    metrics = {m: {b: [final_metrics(formats.read_json(os.path.join(d, "summary.json")))
                       for d in dirs] for b, dirs in per_budget.items()}
               for m, per_budget in runs.items()}
    summary = study_summary(metrics, num_resamples=num_resamples)
    reference_acc = (reference.get("eval") or {}).get(METRIC)
    noise = {}
    for m, per_budget in runs.items():
        largest = per_budget[max(per_budget)]
        rows = [r for d in largest for r in selection_diagnostics(d, noise_dir)
                if r.get("noisy_share_selected") is not None] if noise_dir else []
        if rows:
            noise[m] = {name: {side: float(np.mean([r[f"{name}_share_{side}"] for r in rows]))
                               for side in ("selected", "candidates")}
                        for name in ["noisy"] + [c[0] for c in NOISE_CATEGORIES]}
    summary.update(settings=settings, reference=reference, reference_zero_shot=reference_acc,
                   noise_share_by_kind=noise)
    jest = summary["methods"].get("jest")
    summary["examples_speedup"] = jest["examples_speedup"] if jest else None
    summary["flops_speedup"] = jest["flops_all_in_speedup"] if jest else None
    summary["final_zero_shot"] = {m: r["accuracy_mean"][-1] for m, r in summary["methods"].items()}
    if jest and reference_acc is not None:
        beats = study_stats.paired_difference(jest["accuracy_per_seed"][-1],
                                              [reference_acc] * summary["num_seeds"],
                                              num_resamples=num_resamples)
        summary["learner_minus_reference"] = beats
        summary["learner_beats_reference"] = beats["mean"] > 0
    else:
        summary["learner_beats_reference"] = None
    formats.write_json_atomic(os.path.join(output, "summary.json"), summary)
    _plot(summary["methods"], reference_acc, summary["target_accuracy"],
          os.path.join(output, "accuracy_vs_examples.png"), "examples", "training examples")
    _plot(summary["methods"], reference_acc, summary["target_accuracy"],
          os.path.join(output, "accuracy_vs_flops.png"), "flops_all_in",
          "FLOPs, all-in (reference training, scoring, selection, training)")
    if noise:
        _plot_noise({m: {k: v for k, v in n.items() if k != "noisy"} for m, n in noise.items()},
                    os.path.join(output, "noise_kinds.png"))
    with open(os.path.join(output, "table.md"), "w") as f:
        f.write(render_table(summary))
    return summary


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #

def _fmt(x, spec=".3f"):
    return "never reached" if x is None else format(x, spec)


def _ci(ci, spec=".2f") -> str:
    return "" if not ci else f" [{_fmt_end(ci[0], spec)}, {_fmt_end(ci[1], spec)}]"


def _fmt_end(x, spec) -> str:
    return "not reached" if x is None else format(x, spec)


def _speedup_cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "not reached"
    text = ("≥ " if row["status"] == study_stats.AT_MOST else "") + f"{value:.2f}x"
    text += _ci(row.get(f"{key}_ci"))
    if row.get(f"{key}_significant") is False:
        text += " (not significant)"
    return text


def _ordered(methods) -> list:
    """The baseline first, then by name (summary.json stores keys sorted)."""
    return sorted(methods, key=lambda m: (m != BASELINE, m))


def render_table(summary: dict) -> str:
    if summary.get("format") != FORMAT:
        return _render_legacy_table(summary)
    n = summary["num_seeds"]
    lines = [f"| method | budgets (steps) | final zero-shot at largest budget (mean, 95% CI, "
             f"{n} seed{'s' if n > 1 else ''}) | balanced | R@1 | vs uniform | "
             "examples speedup | FLOPs speedup, all-in | FLOPs speedup, reference amortised |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in _ordered(summary["methods"]):
        row = summary["methods"][m]
        diff = (row["difference_to_uniform"] or [{}])[-1] if m != BASELINE else {}
        vs = "baseline" if m == BASELINE else (
            f"{diff['mean']:+.3f}{_ci(diff['ci'], '+.3f')}"
            + (" (not significant)" if diff.get("significant") is False else "")
            if diff else "no common budget")
        cells = ["1.00x (baseline)"] * 3 if m == BASELINE else [
            _speedup_cell(row, k) for k in _SPEEDUP_KEYS]
        lines.append(
            f"| {m} | {', '.join(map(str, row['budgets']))} | {row['accuracy_mean'][-1]:.3f}"
            f"{_ci(row['accuracy_ci'][-1], '.3f')} | {_fmt(row['balanced_mean'][-1])} | "
            f"{_fmt(row['retrieval_r1_mean'][-1])} | {vs} | " + " | ".join(cells) + " |")
    lines.append(f"\ntarget: uniform's accuracy at its largest budget, "
                 f"{summary['target_accuracy']:.3f}; {summary['amortised_assumption']}.")
    noise = summary.get("noise_share_by_kind") or {}
    if noise:
        kinds = ["noisy"] + [c[0] for c in NOISE_CATEGORIES]
        lines += ["", "| method | " + " | ".join(f"{k} selected (candidates)" for k in kinds)
                  + " |", "| --- |" + " --- |" * len(kinds)]
        for m in _ordered(noise):
            shares = noise[m]
            lines.append(f"| {m} | " + " | ".join(
                f"{shares[k]['selected']:.2f} ({shares[k]['candidates']:.2f})" for k in kinds)
                + " |")
    classes = [r["per_class_largest"] for r in summary["methods"].values()
               if r.get("per_class_largest")]
    if classes:
        names = sorted(classes[0])  # As summary.json stores them.
        lines += ["", "| method (per-class zero-shot, largest budget) | " + " | ".join(names)
                  + " |", "| --- |" + " --- |" * len(names)]
        for m in _ordered(summary["methods"]):
            per_class = summary["methods"][m].get("per_class_largest") or {}
            lines.append(f"| {m} | " + " | ".join(_fmt(per_class.get(c), ".2f")
                                                   for c in names) + " |")
    lines += ["", "| method | training FLOPs per example | learner scoring FLOPs per "
              "candidate | reference scoring FLOPs per pool example |", "| --- | --- | --- | --- |"]
    for m in _ordered(summary["methods"]):
        fpe = summary["methods"][m].get("flops_per_example") or {}
        lines.append(f"| {m} | " + " | ".join(
            f"{fpe[k] / 1e6:.2f} M" if k in fpe else "-"
            for k in ("training", "learner_scoring", "reference_scoring")) + " |")
    ref = summary.get("reference_zero_shot")
    beats = summary.get("learner_minus_reference")
    lines.append(f"\nreference model zero-shot: {_fmt(ref)}; JEST learner minus reference: "
                 + (f"{beats['mean']:+.3f}{_ci(beats['ci'], '+.3f')}"
                    + (" (not significant)" if beats.get("significant") is False else "")
                    if beats else "n/a") + "\n")
    settings = summary.get("settings") or {}
    if settings.get("wall_seconds"):
        m = settings.get("machine") or {}
        elapsed = settings.get("elapsed_seconds")
        processes = settings.get("processes") or 1
        when = (f"{elapsed / 60:.1f} min elapsed ({settings['wall_seconds'] / 60:.1f} min "
                f"summed over {processes} process{'' if processes == 1 else 'es'})"
                if elapsed else f"{settings['wall_seconds'] / 60:.1f} min")
        lines.append(f"study wall time: {when}, data, "
                     f"reference and every run included, on {m.get('cpus', '?')} CPUs "
                     f"({m.get('cpu', '?')}; torch {m.get('torch', '?')}, "
                     f"{m.get('torch_threads', '?')} "
                     f"thread{'' if m.get('torch_threads') == 1 else 's'})\n")
    return "\n".join(lines) + "\n"


def _significance(d: dict) -> str:
    if d.get("significant") is None:
        return "one seed: no interval"
    return "significant" if d["significant"] else "not significant"


def _pool_size(row: dict) -> Optional[float]:
    ledger, fpe = row["ledger"][-1], row.get("flops_per_example") or {}
    if not ledger.get("reference_scoring") or not fpe.get("reference_scoring"):
        return None
    return ledger["reference_scoring"] / fpe["reference_scoring"]


def render_findings(summary: dict, *, jest: str = "jest", num_resamples: int = 2000) -> str:
    """The README's findings, as bullets computed from a study summary (so every number
    in them is checked against it): JEST against uniform and against each clip-score
    variant (paired by seed, bootstrap intervals), and what bounds the speedups: the
    reference's accuracy, passes over the pool, and where JEST's FLOPs go."""
    methods, target = summary["methods"], summary["target_accuracy"]
    j, base = methods[jest], methods[BASELINE]
    largest = j["budgets"][-1]
    lines = []
    d = j["difference_to_uniform"][-1]
    lines.append(
        f"- **{jest} vs uniform** at {largest} steps: {d['mean']:+.3f} zero-shot"
        f"{_ci(d['ci'], '+.3f')} ({_significance(d)}). To reach uniform's accuracy at its "
        f"largest budget ({target:.3f}) it needs "
        + (f"more than its own largest budget: its speedup in examples, if any, is below "
           f"{base['examples'][-1] / j['examples'][-1]:.1f}x (uniform's largest budget over "
           f"its own)" if j["examples_speedup"] is None else
           f"a speedup of {_speedup_cell(j, 'examples_speedup')} in examples, "
           f"{_speedup_cell(j, 'flops_all_in_speedup')} in FLOPs all-in and "
           f"{_speedup_cell(j, 'flops_amortised_speedup')} with the reference amortised "
           f"(below 1x: more FLOPs than uniform)")
        + ".")
    for m in sorted(k for k in methods if k.startswith("clip-score")):
        c = methods[m]
        common = [b for b in j["budgets"] if b in c["budgets"]]
        if not common:
            continue
        b = common[-1]
        diff = study_stats.paired_difference(
            j["accuracy_per_seed"][j["budgets"].index(b)],
            c["accuracy_per_seed"][c["budgets"].index(b)], num_resamples=num_resamples)
        at_b = (f" against uniform's {base['accuracy_mean'][base['budgets'].index(b)]:.3f}"
                if b in base["budgets"] else "")
        lines.append(f"- **{jest} vs {m}** at {b} steps: {diff['mean']:+.3f} zero-shot"
                     f"{_ci(diff['ci'], '+.3f')} ({_significance(diff)}); {m} alone: "
                     f"{c['accuracy_mean'][c['budgets'].index(b)]:.3f}{at_b}.")
    ref = summary.get("reference_zero_shot")
    if ref is not None:
        lines.append(f"- **The reference's own accuracy** is {ref:.3f}: uniform's target "
                     f"({target:.3f}) is {target / ref:.2f} of it, and {jest} ends at "
                     f"{j['accuracy_mean'][-1]:.3f}.")
    pool = _pool_size(j)
    if pool:
        consumed = j["ledger"][-1]["learner_scoring"] / j["flops_per_example"][
            "learner_scoring"] if j["flops_per_example"].get("learner_scoring") else None
        if consumed:
            lines.append(f"- **The pool.** At {largest} steps {jest} draws {consumed:,.0f} "
                         f"candidates from a pool of {pool:,.0f}: {consumed / pool:.1f} "
                         "passes" + (", so it sees its picks again (the paper filters a "
                                     "fresh web-scale stream)." if consumed > pool else "."))
    ledger = j["ledger"][-1]
    lines.append(
        f"- **Where {jest}'s FLOPs go** at {largest} steps (all-in "
        f"{ledger['all_in']:.3g}): training {ledger['training'] / ledger['all_in']:.0%}, "
        f"learner scoring {ledger['learner_scoring'] / ledger['all_in']:.0%}, reference "
        f"scoring {ledger['reference_scoring'] / ledger['all_in']:.0%}, reference training "
        f"{ledger['reference_training'] / ledger['all_in']:.0%}, selection "
        f"{ledger['selection'] / ledger['all_in']:.1%}; uniform's run costs "
        f"{base['ledger'][-1]['all_in']:.3g}.")
    budgets = sorted({b for r in methods.values() for b in r["budgets"]})
    curve = ["", "| zero-shot by budget (steps), mean of seeds | " + " | ".join(map(str, budgets))
             + " |", "| --- |" + " --- |" * len(budgets)]
    for m in _ordered(methods):
        acc = dict(zip(methods[m]["budgets"], methods[m]["accuracy_mean"]))
        curve.append(f"| {m} | " + " | ".join(f"{acc[b]:.3f}" if b in acc else "-"
                                               for b in budgets) + " |")
    return "".join(textwrap.fill(line, 90, subsequent_indent="  ") + "\n" for line in lines) \
        + "\n".join(curve) + "\n"


def _variant_change(summary: dict, name: str, base: str) -> str:
    """What a lever variant changes against `base`, from the study's config (settings)."""
    settings = summary.get("settings") or {}
    variants = settings.get("variants") or {}
    variant = variants.get(name) or {"method": name}
    defaults = {f.name: f.default for f in dataclasses.fields(formats.RunConfig)
                if f.default is not dataclasses.MISSING}
    run = {**defaults, "method": base, **(settings.get("run") or {})}
    fields = {k: v for k, v in variant.items() if k != "budget_steps" and run.get(k) != v}
    return ", ".join(f"{k} {run[k]} → {v}" if k in run else f"{k} {v}"
                     for k, v in sorted(fields.items())) or "-"


def render_lever_findings(summary: dict, *, base: str = "jest",
                          num_resamples: int = 2000) -> str:
    """A lever study as a table: every variant of `base` against `base` itself at each
    shared budget, paired by seed (mean difference in zero-shot and its bootstrap
    interval), and its all-in FLOPs over `base`'s at the largest shared budget. Online
    selection against rescoring every round measures what offline rounds lose to
    staleness."""
    methods = summary["methods"]
    b0 = methods[base]
    budgets = b0["budgets"]
    lines = [f"| variant | change (vs {base}) | "
             + " | ".join(f"zero-shot − {base}, {b} steps" for b in budgets)
             + " | all-in FLOPs / " + base + " |",
             "| --- | --- |" + " --- |" * (len(budgets) + 1)]
    rows = [(base, b0)] + [(m, methods[m]) for m in _ordered(methods)
                           if m not in (BASELINE, base)]
    for m, r in rows:
        cells = []
        for b in budgets:
            if b not in r["budgets"]:
                cells.append("-")
                continue
            acc = r["accuracy_per_seed"][r["budgets"].index(b)]
            if m == base:
                cells.append(f"{np.mean(acc):.3f} (itself)")
                continue
            d = study_stats.paired_difference(acc, b0["accuracy_per_seed"][budgets.index(b)],
                                              num_resamples=num_resamples)
            cells.append(f"{d['mean']:+.3f}{_ci(d['ci'], '+.3f')}"
                         + (" *" if d["significant"] else ""))
        common = [b for b in budgets if b in r["budgets"]]
        flops = (r["flops_all_in"][r["budgets"].index(common[-1])]
                 / b0["flops_all_in"][budgets.index(common[-1])]) if common else None
        change = "(the headline setting)" if m == base else _variant_change(summary, m, base)
        lines.append(f"| {m} | {change} | " + " | ".join(cells) + f" | {_fmt(flops, '.2f')} |")
    seeds = summary.get("num_seeds")
    lines.append(f"\n{seeds} seeds, paired; * the 95% interval excludes zero. Rows are "
                 f"differences in zero-shot accuracy from {base} at the same budget.\n")
    return "\n".join(lines) + "\n"


def _render_legacy_table(summary: dict) -> str:
    """The first committed studies (mid-run checkpoint rule; README's current figures)."""
    seeds = len(summary.get("settings", {}).get("seeds", ())) or 1
    final = "final zero-shot" + (f" (mean ± sd, {seeds} seeds)" if seeds > 1 else "")
    lines = [f"| method | {final} | noisy share selected | examples speedup | "
             "FLOPs speedup |", "| --- | --- | --- | --- | --- |"]
    for m, acc in summary["final_zero_shot"].items():
        sp = summary["methods"].get(m, {})
        noisy = summary.get("noisy_share_selected", {}).get(m)
        per_seed = summary.get("final_zero_shot_per_seed", {}).get(m, [])
        spread = f" ± {np.std(per_seed):.3f}" if len(per_seed) > 1 else ""
        lines.append(f"| {m} | {acc:.3f}{spread} | {_fmt(noisy, '.2f')} | "
                     f"{'1.00 (baseline)' if m == 'uniform' else _fmt(sp.get('examples_speedup'), '.2f')} | "
                     f"{'1.00 (baseline)' if m == 'uniform' else _fmt(sp.get('flops_speedup'), '.2f')} |")
    ref = summary.get("reference_zero_shot")
    lines.append(f"\nreference model zero-shot: {_fmt(ref)}; "
                 f"JEST learner beats reference: {summary.get('learner_beats_reference')}\n")
    return "\n".join(lines) + "\n"
