"""The README's figures are committed study summaries, rendered, not retyped."""
import json
import os
import re

import pytest

from jest_curate import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# README block marker -> the committed report it renders. "results" is the headline:
# the full study (`jest-curate demo --full`).
BLOCKS = {"results": "results/full", "demo": "results/demo", "noise80": "results/noise80",
          "results_v1": "results/full_v1",
          "levers": "results/levers"}


@pytest.mark.parametrize("marker, folder", sorted(BLOCKS.items()))
def test_readme_block_equals_committed_summary(marker, folder):
    summary = json.load(open(os.path.join(ROOT, folder, "summary.json")))
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(rf"<!-- {marker}:begin -->\n(.*?)<!-- {marker}:end -->", readme, re.S)
    assert block, f"README lacks the {marker} block"
    assert block.group(1) == report.render_table(summary)
    for key in ("examples_speedup", "flops_speedup", "final_zero_shot", "reference_zero_shot",
                "learner_beats_reference"):
        assert key in summary


def test_headline_is_the_full_study():
    summary = json.load(open(os.path.join(ROOT, BLOCKS["results"], "summary.json")))
    assert summary["settings"]["config"] == "demo_full.json"
    assert len(summary["settings"]["seeds"]) >= 5 and summary["num_seeds"] >= 5
    assert all(len(r["budgets"]) >= 3 for r in summary["methods"].values())
    assert {"uniform", "jest", "jest-flexi", "clip-score-30", "clip-score-20"} <= set(
        summary["methods"])


def test_readme_findings_are_rendered_from_the_headline_summary():
    summary = json.load(open(os.path.join(ROOT, BLOCKS["results"], "summary.json")))
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- findings:begin -->\n(.*?)<!-- findings:end -->", readme, re.S)
    assert block and block.group(1) == report.render_findings(summary)


def test_the_quick_demo_runs_uniform_clip_score_and_jest():
    summary = json.load(open(os.path.join(ROOT, BLOCKS["demo"], "summary.json")))
    assert summary["settings"]["config"] == "demo.json"
    assert {"uniform", "clip-score-30", "jest"} == set(summary["methods"])
    assert summary["settings"]["wall_seconds"] <= 15 * 60


def test_readme_rounds_scale_block_equals_committed_summary():
    from benchmarks import rounds_scale
    summary = json.load(open(os.path.join(ROOT, "results/rounds_scale/summary.json")))
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- rounds_scale:begin -->\n(.*?)<!-- rounds_scale:end -->", readme,
                      re.S)
    assert block and block.group(1) == rounds_scale.render_summary(summary)
    assert all(gate["pass"] for gate in summary["gates"].values())
