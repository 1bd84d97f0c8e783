"""Recount the committed studies' training FLOPs with today's counter (issue 13).

The studies under results/ were counted by a torch build whose formula for the attention
kernel's backward pass includes recomputing the scores (2.5x the forward), while other
builds counted attention as 0 or, on the math path, at 2x. `training.flops` now counts
every attention kernel with the standard formula (backward = 2x forward), so a training
step of the same shape counts the same on any build. Training FLOPs depend only on the
step's shape (model, b, resolution), so this script measures one trainer step per study
with today's counter, rescales each summary's training FLOPs by new/old per example,
recomputes the FLOP speedups with `jest_curate.report`, and rewrites summary.json,
table.md, accuracy_vs_flops.png and the README's table for that study. Accuracies and scoring FLOPs are
untouched. Idempotent: a summary already recounted is left as it is.

    python scripts/recount_train_flops.py            # rewrite
    python scripts/recount_train_flops.py --check    # print only
"""
import argparse
import io
import json
import os
import re
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jest_curate import formats, report  # noqa: E402
from training import data as data_lib  # noqa: E402
from training import train as train_lib  # noqa: E402

# The studies committed in the old (curves) format; later ones count with today's counter.
STUDIES = {"results_v1": "results/full_v1", "noise80": "results/noise80",
           "levers": "results/levers"}


def measured_train_flops_per_example(model: str, batch_size: int) -> float:
    """One real trainer step of this shape, counted by training.flops."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(batch_size):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(buf, "PNG")
        examples.append(data_lib.Example(f"{i:08x}", buf.getvalue(), f"a photo number {i}"))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train_lib.Trainer(train_lib.TrainConfig(
            model=model, output=tmp, data=None, batch_size=batch_size, total_steps=1,
            stop_at_step=0,
            precision="fp32", device="cpu", tensorboard=False))
        trainer.train_step(examples)
        return trainer.flops_per_example_train


def recount(summary: dict, new_per_example: float) -> dict:
    curves = summary["curves"]
    uniform = curves["uniform"]
    old_per_example = uniform["train_flops"][0] / uniform["examples"][0]
    factor = new_per_example / old_per_example
    for curve in curves.values():
        scoring = [t - tr for t, tr in zip(curve["total_flops"], curve["train_flops"])]
        curve["train_flops"] = [tr * factor for tr in curve["train_flops"]]
        curve["total_flops"] = [tr + s for tr, s in zip(curve["train_flops"], scoring)]
    for method, curve in curves.items():
        if method != "uniform":
            summary["methods"][method] = report.speedups(curves["uniform"], curve)
    headline = summary["methods"].get("jest", {})
    summary["examples_speedup"] = headline.get("examples_speedup")
    summary["flops_speedup"] = headline.get("flops_speedup")
    summary["train_flops_recount"] = {
        "old_per_example": old_per_example, "new_per_example": new_per_example,
        "why": "attention backward counted at 2x its forward on every kernel (was 2.5x: "
               "the build's flash formula counted the recomputed scores)"}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="print the changes, write nothing")
    args = p.parse_args(argv)
    readme_path = os.path.join(ROOT, "README.md")
    readme = open(readme_path, encoding="utf-8").read()
    changes = {}
    for marker, folder in STUDIES.items():
        path = os.path.join(ROOT, folder, "summary.json")
        summary = formats.read_json(path)
        if "train_flops_recount" in summary:
            continue
        run = summary["settings"]["run"]
        if run.get("score_image_size") or run.get("low_res_size"):
            raise SystemExit(f"{folder}: mixed training shapes; recount per shape")
        new = measured_train_flops_per_example(run["learner_model"], run["batch_size"])
        before = {m: s.get("flops_speedup") for m, s in summary["methods"].items()}
        summary = recount(summary, new)
        changes[folder] = {m: [before[m], s.get("flops_speedup")]
                           for m, s in summary["methods"].items()}
        print(f"{folder}: training FLOPs per example "
              f"{summary['train_flops_recount']['old_per_example']:.0f} -> {new:.0f}")
        for m, (old, now) in changes[folder].items():
            print(f"  {m:16s} FLOPs speedup {old} -> {now}")
        if not args.check:
            formats.write_json_atomic(path, summary)
            table = report.render_table(summary)
            with open(os.path.join(ROOT, folder, "table.md"), "w", encoding="utf-8") as f:
                f.write(table)
            report._plot(summary["curves"], summary["reference_zero_shot"],
                         os.path.join(ROOT, folder, "accuracy_vs_flops.png"), "total_flops",
                         "FLOPs (training + scoring)")
            readme = re.sub(rf"(<!-- {marker}:begin -->\n).*?(<!-- {marker}:end -->)",
                            lambda m: m.group(1) + table + m.group(2), readme, flags=re.S)
    if not args.check:
        with open(readme_path, "w", encoding="utf-8") as f:
            f.write(readme)
    print(json.dumps({"recounted": sorted(changes)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
