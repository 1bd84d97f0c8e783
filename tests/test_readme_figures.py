"""The README's figures are committed study summaries, rendered, not retyped."""
import json
import os
import shutil

import pytest

from jest_curate import readme
from jest_curate import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# README block marker -> (committed report, renderer): jest_curate/readme.py. "results"
# is the headline: the full study (`jest-curate demo --full`).
BLOCKS = {marker: folder for marker, (folder, _) in readme.BLOCKS.items()}


@pytest.mark.parametrize("marker", sorted(readme.BLOCKS))
def test_readme_block_equals_what_its_committed_summary_renders(marker):
    text = open(os.path.join(ROOT, "README.md")).read()
    block = readme.block_pattern(marker).search(text)
    assert block, f"README lacks the {marker} block"
    assert block.group(2) == readme.render_block(marker)


@pytest.mark.parametrize("folder", sorted({f for f in BLOCKS.values()
                                           if f != "results/rounds_scale"}))
def test_every_study_summary_has_the_headline_keys(folder):
    summary = json.load(open(os.path.join(ROOT, folder, "summary.json")))
    for key in ("examples_speedup", "flops_speedup", "final_zero_shot", "reference_zero_shot",
                "learner_beats_reference"):
        assert key in summary


@pytest.mark.parametrize("folder", sorted({f for f in BLOCKS.values()
                                           if os.path.isdir(os.path.join(ROOT, f, "runs"))}))
def test_study_summary_is_what_its_committed_runs_give(folder):
    """A study's speedups, intervals and curves recomputed from the committed summary of
    every run it names (one per method, budget and seed) equal its committed summary."""
    summary = json.load(open(os.path.join(ROOT, folder, "summary.json")))
    metrics = {m: {b: [report.final_metrics(json.load(open(os.path.join(
        ROOT, folder, "runs", f"{m}-b{b}-s{seed}.json")))) for seed in summary["settings"]["seeds"]]
        for b in row["budgets"]} for m, row in summary["methods"].items()}
    again = json.loads(json.dumps(report.study_summary(metrics)))
    assert again["target_accuracy"] == summary["target_accuracy"]
    assert again["methods"] == summary["methods"]


def test_readme_command_rewrites_a_stale_block(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    stale = readme.block_pattern("demo").sub(r"\1stale\n\3", text)
    (tmp_path / "README.md").write_text(stale)
    for folder in set(BLOCKS.values()):
        os.makedirs(tmp_path / folder)
        shutil.copy(os.path.join(ROOT, folder, "summary.json"), tmp_path / folder)
    args = ["--readme", str(tmp_path / "README.md")]
    assert readme.run(args + ["--check"]) == 1
    assert readme.run(args) == 0
    assert (tmp_path / "README.md").read_text() == text
    assert readme.run(args + ["--check"]) == 0


def test_headline_is_the_full_study():
    summary = json.load(open(os.path.join(ROOT, BLOCKS["results"], "summary.json")))
    assert summary["settings"]["config"] == "demo_full.json"
    assert len(summary["settings"]["seeds"]) >= 5 and summary["num_seeds"] >= 5
    assert all(len(r["budgets"]) >= 3 for r in summary["methods"].values())
    assert {"uniform", "jest", "jest-flexi", "clip-score-30", "clip-score-20"} <= set(
        summary["methods"])
    # It fits the machine: <= 90 min elapsed on the 2-core CPU, as the report recorded.
    settings = summary["settings"]
    assert settings["elapsed_seconds"] <= 90 * 60 and settings["machine"]["cpus"] == 2
    assert settings["processes"] <= settings["machine"]["cpus"]
    assert settings["machine"]["torch_threads"] * settings["processes"] <= 2


def test_the_lever_study_varies_n_f_and_rescoring_cadence_against_online():
    summary = json.load(open(os.path.join(ROOT, BLOCKS["levers_full"], "summary.json")))
    assert summary["settings"]["config"] == "demo_full_levers.json"
    assert summary["num_seeds"] >= 3
    run = summary["settings"]["run"]
    settings = {m: {**run, **summary["settings"]["variants"].get(m, {})}
                for m in summary["methods"]}
    jest = {k: v for k, v in settings.items() if v.get("method", k) == "jest"}
    assert {v["chunks"] for v in jest.values()} >= {4, 16}
    assert {v["filter_ratio"] for v in jest.values()} >= {0.5, 0.8}
    # Steps between rescorings: every round of 50 steps, and every 4 rounds.
    assert {v["steps_per_round"] * v.get("rescore_every", 1) for v in jest.values()} >= {50, 200}
    assert any(v.get("selection_mode") == "online" for v in jest.values())


def test_the_noise80_study_runs_the_headline_methods_at_80_percent_noise():
    summary = json.load(open(os.path.join(ROOT, BLOCKS["noise80_full"], "summary.json")))
    headline = json.load(open(os.path.join(ROOT, BLOCKS["results"], "summary.json")))
    assert summary["settings"]["config"] == "demo_full_noise80.json"
    assert summary["settings"]["noise"] == 0.8 and headline["settings"]["noise"] == 0.5
    assert summary["num_seeds"] >= 3
    assert set(headline["methods"]) <= set(summary["methods"])
    assert all(len(r["budgets"]) >= 3 for r in summary["methods"].values())


def test_the_quick_demo_runs_uniform_clip_score_and_jest():
    summary = json.load(open(os.path.join(ROOT, BLOCKS["demo"], "summary.json")))
    assert summary["settings"]["config"] == "demo.json"
    assert {"uniform", "clip-score-30", "jest"} == set(summary["methods"])
    assert summary["settings"]["wall_seconds"] <= 15 * 60


def test_the_rounds_benchmark_gates_pass():
    summary = json.load(open(os.path.join(ROOT, "results/rounds_scale/summary.json")))
    assert all(gate["pass"] for gate in summary["gates"].values())
