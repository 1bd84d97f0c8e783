"""The demo's report: speedups defined so they cannot flatter JEST, plots and a table.

Speedup (README "Speedup"): uniform's *target* is the mean over seeds of its last three
evaluations. A method's examples-to-target is the examples seen at the first evaluation
after which its seed-mean zero-shot accuracy stays >= the target; "never reached" is
reported as None. examples_speedup and flops_speedup (scoring included) divide
uniform's totals by the method's values at that evaluation.
"""
import os
from typing import Optional

import numpy as np
import pyarrow as pa

from jest_curate import formats

__all__ = ["seed_mean_curve", "speedups", "selection_diagnostics", "write_report"]

METRIC = "zeroshot_top1"


def seed_mean_curve(summaries: list) -> dict:
    """Seed-mean accuracy, examples and FLOPs at each evaluated round of one method."""
    per_seed = [[r for r in s["rounds"] if r.get("eval")] for s in summaries]
    n = min(len(p) for p in per_seed)
    if n == 0:
        raise ValueError("no evaluations in these runs")
    curve = {"round": [], "examples": [], "total_flops": [], "train_flops": [], "accuracy": []}
    for i in range(n):
        points = [p[i] for p in per_seed]
        curve["round"].append(points[0]["round"])
        for key in ("examples_seen", "total_flops", "train_flops"):
            curve["examples" if key == "examples_seen" else key].append(
                float(np.mean([pt[key] for pt in points])))
        curve["accuracy"].append(float(np.mean([pt["eval"][METRIC] for pt in points])))
    return curve


def _final_per_seed(summaries: list) -> list:
    """Each seed's last evaluated accuracy (the spread behind the seed-mean final)."""
    return [[r for r in s["rounds"] if r.get("eval")][-1]["eval"][METRIC] for s in summaries]


def _first_staying_at_or_above(values, target) -> Optional[int]:
    for i in range(len(values)):
        if all(v >= target for v in values[i:]):
            return i
    return None


def speedups(uniform: dict, method: dict) -> dict:
    """uniform and method are seed-mean curves (see `seed_mean_curve`)."""
    target = float(np.mean(uniform["accuracy"][-3:]))
    i = _first_staying_at_or_above(method["accuracy"], target)
    result = {"target_accuracy": target, "uniform_examples": uniform["examples"][-1],
              "uniform_flops": uniform["total_flops"][-1], "reached": i is not None}
    if i is None:
        result.update(examples_to_target=None, flops_to_target=None, examples_speedup=None,
                      flops_speedup=None)
    else:
        result.update(examples_to_target=method["examples"][i],
                      flops_to_target=method["total_flops"][i],
                      examples_speedup=uniform["examples"][-1] / method["examples"][i],
                      flops_speedup=uniform["total_flops"][-1] / method["total_flops"][i])
    return result


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


def _seed_mean_rows(per_seed: list) -> list:
    """Per-round diagnostics averaged over seeds (rounds every seed has)."""
    n = min(len(rows) for rows in per_seed)
    merged = []
    for i in range(n):
        rows = [seed_rows[i] for seed_rows in per_seed]
        keys = set.intersection(*(set(r) for r in rows))
        merged.append({k: rows[0][k] if k == "round" else
                       (None if any(r[k] is None for r in rows)
                        else float(np.mean([r[k] for r in rows]))) for k in keys})
    return merged


def _plot(curves: dict, reference_acc: Optional[float], path: str, x_key: str, xlabel: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, c in curves.items():
        ax.plot(c[x_key], c["accuracy"], marker="o", label=method)
    if reference_acc is not None:
        ax.axhline(reference_acc, color="gray", linestyle="--", label="reference")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("zero-shot top-1 (seed mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_diagnostics(diagnostics: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method, rows in diagnostics.items():
        rounds = [r["round"] for r in rows]
        if rows and "noisy_share_selected" in rows[0]:
            a.plot(rounds, [r["noisy_share_selected"] for r in rows], marker="o", label=method)
        if rows and "learnability_selected" in rows[0]:
            b.plot(rounds, [r["learnability_selected"] for r in rows], marker="o",
                   label=f"{method} selected")
            b.plot(rounds, [r["learnability_rejected"] for r in rows], linestyle="--",
                   label=f"{method} rejected")
    a.set_title("share of ground-truth noisy captions selected")
    b.set_title("learnability (L_learner - L_ref) per example")
    for ax in (a, b):
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(output: str, *, runs: dict, reference_eval: dict, noise_dir: Optional[str],
                 settings: dict) -> dict:
    """runs: {method: [run dirs, one per seed]}. Writes OUTPUT/{summary.json, table.md, *.png}."""
    os.makedirs(output, exist_ok=True)
    summaries = {m: [formats.read_json(os.path.join(d, "summary.json")) for d in dirs]
                 for m, dirs in runs.items()}
    curves = {m: seed_mean_curve(s) for m, s in summaries.items()}
    diagnostics = {m: _seed_mean_rows([selection_diagnostics(d, noise_dir) for d in dirs])
                   for m, dirs in runs.items()}
    reference_acc = reference_eval.get(METRIC)
    summary = {"settings": settings, "reference_zero_shot": reference_acc,
               "final_zero_shot": {m: c["accuracy"][-1] for m, c in curves.items()},
               "final_zero_shot_per_seed": {m: _final_per_seed(s) for m, s in summaries.items()},
               "curves": curves, "methods": {}}
    for m in curves:
        if m != "uniform" and "uniform" in curves:
            summary["methods"][m] = speedups(curves["uniform"], curves[m])
        rows = [r for r in diagnostics[m] if r.get("noisy_share_selected") is not None]
        if rows:
            summary.setdefault("noisy_share_selected", {})[m] = float(
                np.mean([r["noisy_share_selected"] for r in rows]))
            summary.setdefault("noise_share_by_kind", {})[m] = {
                name: {side: float(np.mean([r[f"{name}_share_{side}"] for r in rows]))
                       for side in ("selected", "candidates")}
                for name, _, _ in NOISE_CATEGORIES}
    headline = summary["methods"].get("jest", {})
    summary["examples_speedup"] = headline.get("examples_speedup")
    summary["flops_speedup"] = headline.get("flops_speedup")
    best_learner = max(summary["final_zero_shot"].values())
    summary["learner_beats_reference"] = (reference_acc is not None
                                          and summary["final_zero_shot"].get("jest", best_learner)
                                          > reference_acc)
    formats.write_json_atomic(os.path.join(output, "summary.json"), summary)
    _plot(curves, reference_acc, os.path.join(output, "accuracy_vs_examples.png"),
          "examples", "training examples seen")
    _plot(curves, reference_acc, os.path.join(output, "accuracy_vs_flops.png"),
          "total_flops", "FLOPs (training + scoring)")
    _plot_diagnostics(diagnostics, os.path.join(output, "selection.png"))
    with open(os.path.join(output, "table.md"), "w") as f:
        f.write(render_table(summary))
    return summary


def _fmt(x, spec=".3f"):
    return "never reached" if x is None else format(x, spec)


def render_table(summary: dict) -> str:
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
