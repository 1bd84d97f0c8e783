"""`jest-curate demo` on a tiny study: split over two --part processes, then the report."""
import json
import os

import pytest

from jest_curate import formats, report
from pipelines import demo

TINY = {
    "seeds": [0],
    "methods": ["uniform", "jest"],
    "noise": 0.5,
    "corpus": {"pool_size": 400, "curated_size": 96, "eval_size": 64, "retrieval_size": 32,
               "shard_size": 128},
    "reference": {"model": "jest-vit-micro-28", "steps": 4, "batch_size": 16,
                  "precision": "fp32", "holdout_fraction": 0.2, "eval_every": 2,
                  "patience": 1, "low_res_size": 14, "low_res_fraction": 0.25},
    "budget_steps": [2, 4],
    "run": {"batch_size": 8, "super_batch_size": 40, "chunks": 4, "steps_per_round": 2,
            "rounds": 2, "learner_model": "jest-vit-micro-28",
            "reference_model": "jest-vit-micro-28", "train_precision": "fp32",
            "eval_max_examples": 32},
}


def _run_summaries(out):
    """{finished run: mtimes of its rounds' completion markers}."""
    runs = os.path.join(out, "runs")
    if not os.path.isdir(runs):
        return {}
    return {name: [os.stat(os.path.join(runs, name, "rounds", r, "round.json")).st_mtime_ns
                   for r in sorted(os.listdir(os.path.join(runs, name, "rounds")))]
            for name in sorted(os.listdir(runs))
            if os.path.exists(os.path.join(runs, name, "summary.json"))}


def test_parts_split_the_runs_and_the_last_call_writes_the_report(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = str(tmp_path / "demo")
    argv = ["--config", str(config), "--output", out, "--runner=FnApiRunner"]

    assert demo.run(argv + ["--part", "0/2"]) == 0
    assert list(_run_summaries(out)) == ["jest-b2-s0", "uniform-b2-s0"]
    assert not os.path.exists(os.path.join(out, "report"))
    assert demo.run(argv + ["--part", "1/2"]) == 0
    done = _run_summaries(out)
    assert list(done) == ["jest-b2-s0", "jest-b4-s0", "uniform-b2-s0", "uniform-b4-s0"]
    # Each budget is its own run with its own schedule: 1 and 2 rounds.
    assert [len(done[f"uniform-b{b}-s0"]) for b in (2, 4)] == [1, 2]

    # A finished run keeps only its step-0 and last learner checkpoints.
    ckpts = os.listdir(os.path.join(out, "runs", "jest-b4-s0", "learner", "checkpoints"))
    assert sorted(c for c in ckpts if c.endswith(".pt")) == ["step_00000000.pt",
                                                             "step_00000004.pt"]

    capsys.readouterr()
    assert demo.run(argv + ["--processes", "2"]) == 0
    assert _run_summaries(out) == done  # Resumed, not rerun (pruned checkpoints and all).
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.load(open(os.path.join(out, "report", "summary.json")))
    assert last["examples_speedup"] == summary["examples_speedup"]
    assert set(summary["final_zero_shot"]) == {"uniform", "jest"}
    assert summary["format"] == "jest-curate/study/v2"
    jest = summary["methods"]["jest"]
    assert jest["budgets"] == [2, 4] and jest["examples"] == [16, 32]
    assert jest["status"] in ("interpolated", "at_most_smallest_budget", "not_reached")
    assert jest["examples_speedup_ci"] is None  # One seed: no interval.
    ledger = jest["ledger"][-1]
    assert ledger["reference_training"] == summary["reference"]["training_flops"] > 0
    assert ledger["all_in"] == sum(ledger[k] for k in (
        "reference_training", "reference_scoring", "learner_scoring", "selection", "training"))
    assert summary["methods"]["uniform"]["ledger"][-1]["reference_training"] == 0
    # The reference stopped on held-out loss; its ledger cost is everything it spent.
    stopping = summary["reference"]["early_stopping"]
    assert stopping["best_step"] in (2, 4) and summary["reference"]["checkpoint"].endswith(
        f"step_{stopping['best_step']:08d}.pt")
    assert summary["reference"]["training_flops"] == (stopping["training_flops"]
                                                      + stopping["holdout_flops"])
    assert "learner_minus_reference" in summary
    ref_ckpt = formats.load_checkpoint(summary["reference"]["checkpoint"])
    assert ref_ckpt.extra["run"]["low_res_size"] == 14  # Multi-resolution reference.
    assert set(summary["noise_share_by_kind"]["jest"]) == {
        "noisy", "mismatched", "boilerplate", "off_topic", "duplicate"}
    table = open(os.path.join(out, "report", "table.md")).read()
    assert table == report.render_table(summary) and "reference amortised" in table
    for png in ("accuracy_vs_examples.png", "accuracy_vs_flops.png", "noise_kinds.png"):
        assert os.path.getsize(os.path.join(out, "report", png)) > 1000
    assert summary["settings"]["corpus"]["pool_size"] == 400
    # Elapsed is the union of the pieces' intervals; the final call, which only finds
    # them done, adds none (so rewriting a report does not move its wall time).
    settings = summary["settings"]
    assert settings["processes"] == 2 and 0 < settings["elapsed_seconds"]
    timing = json.load(open(os.path.join(out, "runs", "jest-b4-s0", "timing.json")))
    assert len(timing["intervals"]) == 1 and timing["torch_threads"]
    assert demo.run(argv + ["--processes", "2"]) == 0  # The report again: the same time.
    again = json.load(open(os.path.join(out, "report", "summary.json")))["settings"]
    assert (again["elapsed_seconds"], again["wall_seconds"]) == (
        settings["elapsed_seconds"], settings["wall_seconds"])
    assert settings["elapsed_seconds"] <= settings["wall_seconds"] + 0.1
    assert "min elapsed (" in table and "summed over 2 processes" in table

    # Another study with the same data and reference shares the output and its runs, and
    # writes its report where it is told.
    other = dict(TINY, methods=["uniform"], budget_steps=[4])
    config.write_text(json.dumps(other))
    assert demo.run(argv + ["--report", str(tmp_path / "other")]) == 0
    assert _run_summaries(out) == done
    assert set(json.load(open(tmp_path / "other" / "summary.json"))["final_zero_shot"]) == {
        "uniform"}
    demo_json = json.load(open(os.path.join(out, "data", "demo.json")))
    assert demo_json["counts"]["pool"] == 400


def test_elapsed_is_the_union_of_intervals():
    assert demo.elapsed_seconds([{"intervals": [[0, 10], [20, 30]]},
                                 {"intervals": [[5, 15], [29, 31]]}]) == 26
    assert demo.elapsed_seconds([]) == 0
    assert demo.elapsed_seconds([{"wall_seconds": 3.0}]) is None  # Timed before intervals.


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2"])
def test_part_must_name_one_of_n(text):
    with pytest.raises(ValueError, match="--part"):
        demo.parse_part(text)


def test_unknown_corpus_key_is_refused(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**TINY, "corpus": {"pool": 10}}))
    with pytest.raises(ValueError, match="corpus keys"):
        demo.DemoConfig.load(str(config))


def test_budgets_must_be_whole_rounds(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**TINY, "budget_steps": [3]}))
    with pytest.raises(ValueError, match="whole number of rounds"):
        demo.plan_runs(demo.DemoConfig.load(str(config)))


def test_the_gpu_recipe_runs_on_cpu_at_a_tiny_budget(tmp_path):
    """jest_curate/configs/demo_gpu.json (the headline study at 10x the budget, a larger
    model, one GPU) as committed, shrunk only in sizes, steps and seeds."""
    cfg = json.load(open(os.path.join(demo.CONFIG_DIR, "demo_gpu.json")))
    full = json.load(open(os.path.join(demo.CONFIG_DIR, "demo_full.json")))
    assert min(cfg["budget_steps"]) >= 10 * min(full["budget_steps"])
    assert set(cfg["variants"]) == set(full["variants"]) and cfg["methods"] == full["methods"]
    cfg.update(corpus=TINY["corpus"], budget_steps=[2], seeds=[0])
    cfg["reference"].update(steps=2, eval_every=1, patience=1, warmup_steps=0)
    cfg["run"].update(batch_size=8, super_batch_size=40, filter_ratio=None, chunks=4,
                      steps_per_round=2,
                      rounds=1, warmup_steps=0, eval_max_examples=16)
    cfg["run"] = {k: v for k, v in cfg["run"].items() if v is not None}
    for variant in cfg["variants"].values():
        if "budget_steps" in variant:
            variant["budget_steps"] = [2]
        if variant["method"] == "clip-score":
            variant.update(super_batch_size=8)
            variant.pop("filter_ratio")
    config = tmp_path / "gpu_tiny.json"
    config.write_text(json.dumps(cfg))
    out = str(tmp_path / "demo")
    assert demo.run(["--config", str(config), "--output", out, "--runner=FnApiRunner"]) == 0
    summary = json.load(open(os.path.join(out, "report", "summary.json")))
    assert set(summary["methods"]) == {"uniform", "independent", "jest", "clip-score-30",
                                       "clip-score-20", "jest-flexi"}
    assert summary["settings"]["wall_seconds"] > 0 and summary["settings"]["machine"]["cpus"]


@pytest.mark.parametrize("name", sorted(os.listdir(demo.CONFIG_DIR)))
def test_every_committed_study_config_plans_valid_runs(name):
    if not name.startswith("demo"):
        pytest.skip("not a study config")
    cfg = demo.DemoConfig.load(os.path.join(demo.CONFIG_DIR, name))
    plan = demo.plan_runs(cfg)
    assert plan
    for variant, steps, seed, fields in plan:
        formats.RunConfig(**{**fields, "name": f"{variant}-b{steps}-s{seed}", "seed": seed})


def test_a_variant_can_run_its_own_budgets():
    cfg = demo.DemoConfig.load(os.path.join(demo.CONFIG_DIR, "demo_full.json"))
    cfg = demo.DemoConfig(**{**cfg.__dict__, "variants": {
        **cfg.variants, "uniform": {"method": "uniform", "budget_steps": [50, 800]}}})
    budgets = {}
    for name, steps, _, fields in demo.plan_runs(cfg):
        budgets.setdefault(name, set()).add(steps)
        assert "budget_steps" not in fields
    assert budgets["uniform"] == {50, 800} and budgets["jest"] == set(cfg.budget_steps)
