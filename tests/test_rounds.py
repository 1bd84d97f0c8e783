"""Rounds: a tiny two-round run end to end, resume after a kill, reproducibility, report."""
import dataclasses
import hashlib
import logging
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from jest_core import filtering
from jest_curate import demo_data
from jest_curate import formats
from jest_curate import report
from pipelines import round_job
from pipelines import rounds
from training import train as train_lib

BEAM = ["--runner=FnApiRunner"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    data = str(root / "data")
    demo_data.build_demo_corpus(data, seed=0, noise=0.5, pool_size=400, curated_size=96,
                                eval_size=64, retrieval_size=32, shard_size=128)
    ref = train_lib.train(train_lib.TrainConfig(
        model="jest-vit-micro-28", output=str(root / "reference"),
        data=os.path.join(data, "curated"), data_format="canonical", batch_size=16,
        total_steps=3, precision="fp32", tensorboard=False))
    cfg = formats.RunConfig(
        name="tiny", seed=5, method="jest", batch_size=8, super_batch_size=40, chunks=4,
        steps_per_round=2, rounds=2, learner_model="jest-vit-micro-28",
        reference_model="jest-vit-micro-28", train_precision="fp32",
        pool=os.path.join(data, "pool"), reference_checkpoint=ref.checkpoint,
        eval_data=os.path.join(data, "eval"), eval_max_examples=32, candidate_shard_rows=80)
    return root, data, cfg


@pytest.fixture(scope="module")
def finished(setup):
    root, _, cfg = setup
    out = str(root / "run_a")
    summary = rounds.run_rounds(cfg, out, beam_args=BEAM,
                                reference_embeddings=str(root / "ref_emb"))
    return out, summary


def _digests(out, subdirs=("rounds",)):
    result = {}
    for sub in subdirs:
        for dirpath, _, files in os.walk(os.path.join(out, sub)):
            for f in files:
                if f == round_job.METRICS:  # Seconds measured: the one file meant to vary.
                    continue
                path = os.path.join(dirpath, f)
                result[os.path.relpath(path, out)] = hashlib.sha256(
                    open(path, "rb").read()).hexdigest()
    return result


def test_plan_round_is_arithmetic_on_super_batches():
    # 10 super-batches per pass, 3 per round: 3 rounds per pass, the 4th starts pass 1.
    plan = [rounds.plan_round(r, super_batches=10, steps_per_round=3) for r in range(7)]
    assert [p for p, _, _ in plan] == [0, 0, 0, 1, 1, 1, 2]
    assert plan[:4] == [(0, 0, 3), (0, 3, 6), (0, 6, 9), (1, 0, 3)]
    with pytest.raises(ValueError, match="fewer than one round"):
        rounds.plan_round(0, super_batches=2, steps_per_round=3)


def test_tiny_run_writes_every_stage(setup, finished):
    root, _, cfg = setup
    out, summary = finished
    for r in range(2):
        rdir = os.path.join(out, "rounds", f"r{r:04d}")
        for name in ("slice.json", "scored_by.json", "round.json", "eval.json",
                     "selection/_SUCCESS", "selection/shards/sizes.json"):
            assert os.path.exists(os.path.join(rdir, name)), name
        stats = formats.read_json(os.path.join(rdir, "selection", "stats.json"))
        assert stats["selected"] == cfg.batch_size * cfg.steps_per_round
        assert stats["selected"] + stats["rejected"] + stats["dead_lettered"] == stats["seen"] \
            == cfg.steps_per_round * cfg.super_batch_size
        scored = formats.read_json(os.path.join(rdir, "scored_by.json"))
        assert scored["checkpoint_step"] == r * cfg.steps_per_round
    ckpts = sorted(os.listdir(os.path.join(out, "learner", "checkpoints")))
    assert {"step_00000000.pt", "step_00000002.pt", "step_00000004.pt"} <= set(ckpts)
    assert [r["examples_seen"] for r in summary["rounds"]] == [16, 32]
    assert summary["rounds"][-1]["total_flops"] > summary["rounds"][-1]["train_flops"] > 0
    assert 0.0 <= summary["rounds"][-1]["eval"]["zeroshot_top1"] <= 1.0


def test_killed_run_resumes_to_the_same_outputs(setup, finished, monkeypatch):
    root, _, cfg = setup
    out_a, _ = finished
    out_b = str(root / "run_b")
    real_train, calls = train_lib.train, []

    def dies_in_round_1(config):
        calls.append(config.stop)
        if config.stop == 4:  # Round 1's training: selection is done, training is not.
            raise KeyboardInterrupt("killed")
        return real_train(config)

    monkeypatch.setattr(train_lib, "train", dies_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        rounds.run_rounds(cfg, out_b, beam_args=BEAM, reference_embeddings=str(root / "ref_emb"))
    assert os.path.exists(os.path.join(out_b, "rounds", "r0001", "selection", "_SUCCESS"))
    assert not os.path.exists(os.path.join(out_b, "rounds", "r0001", "round.json"))
    monkeypatch.setattr(train_lib, "train", real_train)
    select_mtime = os.path.getmtime(os.path.join(out_b, "rounds", "r0001", "selection",
                                                 "_SUCCESS"))
    rounds.run_rounds(cfg, out_b, beam_args=BEAM, reference_embeddings=str(root / "ref_emb"))
    # The finished selection stage was not redone...
    assert os.path.getmtime(os.path.join(out_b, "rounds", "r0001", "selection",
                                         "_SUCCESS")) == select_mtime
    # ...and the resumed run equals the uninterrupted one (same seed: reproducible).
    a, b = _digests(out_a), _digests(out_b)
    assert a.keys() == b.keys()
    differing = sorted(k for k in a if a[k] != b[k] and not k.endswith("round.json"))
    assert differing == []
    last_a = formats.load_checkpoint(os.path.join(out_a, "learner", "checkpoints",
                                                  "step_00000004.pt"))
    last_b = formats.load_checkpoint(os.path.join(out_b, "learner", "checkpoints",
                                                  "step_00000004.pt"))
    assert all(torch.equal(last_a.state_dict[k], last_b.state_dict[k]) for k in last_a.state_dict)


def test_config_change_is_refused_and_report_is_written(setup, finished):
    root, data, cfg = setup
    out, _ = finished
    with pytest.raises(ValueError, match="another config"):
        rounds.run_rounds(dataclasses.replace(cfg, chunks=2), out, beam_args=BEAM,
                          reference_embeddings=str(root / "ref_emb"))
    uniform_out = str(root / "run_uniform")
    rounds.run_rounds(dataclasses.replace(cfg, method="uniform"), uniform_out, beam_args=BEAM,
                      reference_embeddings=str(root / "ref_emb"))
    summary = report.write_report(
        str(root / "report"), runs={"uniform": {4: [uniform_out]}, "jest": {4: [out]}},
        reference={"eval": {"zeroshot_top1": 0.1}},
        noise_dir=os.path.join(data, "ground_truth", "noise"), settings={})
    for key in ("examples_speedup", "flops_speedup", "final_zero_shot", "reference_zero_shot",
                "learner_beats_reference"):
        assert key in summary
    for png in ("accuracy_vs_examples.png", "accuracy_vs_flops.png", "noise_kinds.png"):
        assert os.path.getsize(os.path.join(str(root / "report"), png)) > 1000
    assert "uniform" in open(os.path.join(str(root / "report"), "table.md")).read()


def test_shared_reference_cache_keeps_one_directory_per_scoring_settings(setup, finished):
    """A cheap-scoring run sharing the reference root never replaces another run's scores."""
    root, _, cfg = setup
    shared = str(root / "ref_emb")
    native = os.path.join(shared, rounds.scoring_key(cfg))
    before = _digests(native, subdirs=("",))
    cheap = dataclasses.replace(cfg, name="tiny-cheap", score_image_size=14, rounds=1)
    rounds.run_rounds(cheap, str(root / "run_cheap"), beam_args=BEAM,
                      reference_embeddings=shared)
    assert rounds.scoring_key(cheap) != rounds.scoring_key(cfg)
    assert _digests(native, subdirs=("",)) == before
    cards = [formats.read_model_card(os.path.join(shared, rounds.scoring_key(c)))
             for c in (cfg, cheap)]
    assert cards[0].model_digest != cards[1].model_digest
    # Another reference model with the same settings is refused, not served these scores.
    other_ref = train_lib.train(train_lib.TrainConfig(
        model="jest-vit-micro-28", output=str(root / "other_reference"),
        data=os.path.join(setup[1], "curated"), data_format="canonical", batch_size=16,
        total_steps=1, precision="fp32", seed=99, tensorboard=False))
    with pytest.raises(ValueError, match="another model"):
        rounds.run_rounds(dataclasses.replace(cfg, name="other", reference_checkpoint=
                                              other_ref.checkpoint),
                          str(root / "run_other"), beam_args=BEAM, reference_embeddings=shared)
    assert _digests(native, subdirs=("",)) == before


def test_every_pool_example_of_a_pass_is_accounted_for_once(setup, finished):
    """Selected/rejected by a round, in a super-batch no round reached, or carried."""
    _, _, cfg = setup
    out, summary = finished
    pinned = formats.read_json(os.path.join(out, "passes", "p0000.json"))
    layout = formats.read_layout(os.path.join(out, pinned["layout"]))
    decided = []
    for r in range(cfg.rounds):
        manifest = os.path.join(out, "rounds", f"r{r:04d}", "selection", "manifest")
        for shard in formats.list_shards(manifest):
            decided += formats.read_shard(shard, schema=formats.ROUND_MANIFEST_SCHEMA).column(
                "uid").to_pylist()
    in_rounds = cfg.rounds * cfg.steps_per_round
    unused = [u for s in layout.shards_between(in_rounds, layout.super_batches)
              for u, sb in zip(*formats.read_shard(s.info, columns=["uid", "super_batch"])
                               .to_pydict().values()) if sb >= in_rounds]
    carried = formats.read_shard(os.path.join(layout.root, "carried.parquet")).column(
        "uid").to_pylist()
    pool = formats.list_shards(os.path.join(str(setup[0] / "ref_emb"),
                                            rounds.scoring_key(cfg)))
    pool_uids = [u for s in pool for u in formats.read_embeddings_shard(s).uids]
    assert sorted(decided + unused + carried) == sorted(pool_uids)
    acc = summary["pass_accounting"][0]
    assert (acc["in_rounds"], acc["carried"], acc["pool"]) == (len(decided), len(carried),
                                                               len(pool_uids))
    assert acc["unused_super_batches"] * cfg.super_batch_size == len(unused)


def test_inputs_changed_under_a_run_are_refused(setup, finished):
    """A resumed run whose pass would be laid out from other reference embeddings stops."""
    root, _, cfg = setup
    out, _ = finished
    with pytest.raises(ValueError, match="inputs changed under the run"):
        rounds.run_rounds(cfg, out, beam_args=BEAM, reference_embeddings=str(root / "ref_b"))


def test_clip_score_keeps_the_top_fraction_once_and_trains_uniformly_on_it(setup, finished):
    root, _, cfg = setup
    clip = dataclasses.replace(cfg, name="tiny-clip", method="clip-score", keep_fraction=0.5,
                               super_batch_size=cfg.batch_size)
    out = str(root / "run_clip")
    summary = rounds.run_rounds(clip, out, beam_args=BEAM,
                                reference_embeddings=str(root / "ref_emb"))
    ref_dir = os.path.join(str(root / "ref_emb"), rounds.scoring_key(clip))
    uids, sims = [], []
    for shard in formats.list_shards(ref_dir):
        emb = formats.read_embeddings_shard(shard)
        uids += emb.uids
        sims.append(filtering.clip_scores(image=emb.image, text=emb.text))
    sims = np.concatenate(sims)
    # The distributed rule keeps exactly what a sort of the whole pool keeps.
    kept = {uids[i] for i in filtering.top_fraction(sims, fraction=0.5, keys=uids)}
    rule = formats.read_json(os.path.join(out, "clip_score", "rule.json"))
    assert {u for u, k in zip(uids, filtering.keeps(sims, uids, rule)) if k} == kept
    assert rule["pool"] == len(uids) and rule["kept"] == len(kept) == round(0.5 * len(uids))
    assert rule["flops"] == 2 * len(uids) * 64
    for r in range(clip.rounds):
        sel = os.path.join(out, "rounds", f"r{r:04d}", "selection")
        sel_stats = formats.read_json(os.path.join(sel, "stats.json"))
        assert sel_stats["method"] == "uniform" and sel_stats["rejected"] == 0
        manifest = formats.read_shard(formats.list_shards(os.path.join(sel, "manifest"))[0])
        chosen = [u for u, s in zip(manifest.column("uid").to_pylist(),
                                    manifest.column("selected").to_pylist()) if s]
        assert chosen and set(chosen) <= kept
        assert not os.path.exists(os.path.join(out, "rounds", f"r{r:04d}", "scored_by.json"))
    stats = rule
    assert summary["pool_examples"] == len(kept) and summary["filter_flops"] == stats["flops"]
    assert summary["reference_scoring_flops"] > 0
    last = summary["rounds"][-1]
    assert last["ledger"]["learner_scoring"] == 0
    assert last["ledger"]["selection"] == stats["flops"]  # Uniform selection: no matmuls.
    assert last["total_flops"] == (last["train_flops"] + summary["reference_scoring_flops"]
                                   + stats["flops"] + summary["reference_training_flops"])
    with pytest.raises(ValueError, match="filter_ratio 0"):
        dataclasses.replace(clip, super_batch_size=40)
    with pytest.raises(ValueError, match="keep_fraction"):
        dataclasses.replace(cfg, keep_fraction=0.3)


def test_multi_resolution_training_reaches_the_learner(setup, finished):
    root, _, cfg = setup
    flexi = dataclasses.replace(cfg, name="tiny-flexi", method="uniform", rounds=1,
                                train_low_res_size=14, train_low_res_fraction=0.5)
    train_cfg = rounds._train_config(flexi, rounds._Paths(str(root / "x"), "ref", "layouts"), "d", 1)
    assert (train_cfg.low_res_size, train_cfg.low_res_fraction) == (14, 0.5)
    out = str(root / "run_flexi")
    rounds.run_rounds(flexi, out, beam_args=BEAM, reference_embeddings=str(root / "ref_emb"))
    step = flexi.steps_per_round
    ckpt = formats.load_checkpoint(os.path.join(out, "learner", "checkpoints",
                                                f"step_{step:08d}.pt"))
    assert ckpt.extra["run"]["low_res_size"] == 14
    assert ckpt.extra["run"]["low_res_fraction"] == 0.5
    full = formats.load_checkpoint(os.path.join(finished[0], "learner", "checkpoints",
                                                f"step_{step:08d}.pt"))
    # Half of every batch at 14 px costs less per example than all of it at 28 px.
    assert ckpt.extra["flops_per_example_train"] < full.extra["flops_per_example_train"]
    summary = formats.read_json(os.path.join(out, "summary.json"))
    assert summary["flops_per_example"]["training"] < finished[1]["flops_per_example"][
        "training"]
    with pytest.raises(ValueError, match="multi-resolution"):
        dataclasses.replace(cfg, train_low_res_size=14)


def test_the_ledger_adds_up_every_cost_of_the_run(setup, finished):
    root, _, cfg = setup
    out, summary = finished
    ref = formats.load_checkpoint(cfg.reference_checkpoint)
    assert summary["reference_training_flops"] == ref.extra["flops"] > 0
    learner = selection = 0
    for r, entry in enumerate(summary["rounds"]):
        rec = formats.read_json(os.path.join(out, "rounds", f"r{r:04d}", "round.json"))
        stats = formats.read_json(os.path.join(out, "rounds", f"r{r:04d}", "selection",
                                               "stats.json"))
        learner += rec["scoring_flops"]
        selection += stats["selection_flops"]
        ledger = entry["ledger"]
        assert ledger == {
            "reference_training": ref.extra["flops"],
            "reference_scoring": summary["reference_scoring_flops"],
            "learner_scoring": learner, "selection": selection,
            "training": rec["train_flops"],
            "all_in": ref.extra["flops"] + summary["reference_scoring_flops"] + learner
            + selection + rec["train_flops"],
            "amortised": summary["reference_scoring_flops"] + learner + selection
            + rec["train_flops"]}
        assert entry["total_flops"] == ledger["all_in"]
        assert entry["total_flops_amortised"] == ledger["amortised"]
    assert selection > 0 and learner > 0
    fpe = summary["flops_per_example"]
    assert fpe["training"] == summary["rounds"][-1]["train_flops"] / 32
    assert fpe["learner_scoring"] > 0 and fpe["reference_scoring"] > 0
    # A recorded reference cost (e.g. early stopping's) replaces the checkpoint's.
    recorded = dataclasses.replace(cfg, name="tiny-recorded", rounds=1,
                                   reference_training_flops=123)
    again = rounds.run_rounds(recorded, str(root / "run_recorded"), beam_args=BEAM,
                              reference_embeddings=str(root / "ref_emb"))
    assert again["rounds"][0]["ledger"]["reference_training"] == 123


def test_rounds_train_with_two_processes(setup, finished, caplog):
    """train_processes = 2: each round's training runs under torchrun (gloo on CPU); the
    processes' output goes to the log, not the terminal."""
    caplog.set_level(logging.INFO, logger="training.main")
    root, _, cfg = setup
    out_a, summary_a = finished
    out_b = str(root / "run_ddp")
    summary_b = rounds.run_rounds(dataclasses.replace(cfg, train_processes=2), out_b,
                                  beam_args=BEAM, reference_embeddings=str(root / "ref_emb"))
    for a, b in zip(summary_a["rounds"], summary_b["rounds"]):
        assert (b["examples_seen"], b["train_flops"]) == \
            (a["examples_seen"], a["train_flops"])  # Global, not one rank's.
    last = formats.load_checkpoint(os.path.join(out_b, "learner", "checkpoints",
                                                "step_00000004.pt"))
    assert last.extra["world_size"] == 2
    # Round 0 is scored by the step-0 learner, the same in both runs: the same selection.
    selection = os.path.join("rounds", "r0000", "selection")
    digests_a, digests_b = _digests(out_a, (selection,)), _digests(out_b, (selection,))
    assert digests_a and digests_a == digests_b
    assert any(r.message.startswith("[rank 0] ") and "step 4" in r.message
               for r in caplog.records)


def test_rescoring_every_two_rounds_scores_both_with_one_checkpoint(setup, finished):
    """One round job per period: round 1 is scored by step 0's learner, K steps stale."""
    root, _, cfg = setup
    out = str(root / "run_k2")
    rounds.run_rounds(dataclasses.replace(cfg, rescore_every=2), out, beam_args=BEAM,
                      reference_embeddings=str(root / "ref_emb"),
                      layouts=str(root / "run_a" / "layouts"))  # The same passes, reused.
    scored = [formats.read_json(os.path.join(out, "rounds", f"r{r:04d}", "scored_by.json"))
              for r in range(2)]
    assert [s["checkpoint_step"] for s in scored] == [0, 0]
    assert [s["staleness_steps"] for s in scored] == [0, cfg.steps_per_round]
    # Round 0 is the same selection as the every-round run's; round 1 is not re-scored.
    selection = os.path.join("rounds", "r0000", "selection")
    assert _digests(out, (selection,)) == _digests(finished[0], (selection,))
    assert not os.path.exists(os.path.join(out, "layouts"))


def test_a_restart_reads_no_per_example_state(setup, finished, monkeypatch):
    """Resuming a finished run touches indexes and markers only: no embed cache check over
    every embeddings shard, no layout, no selection."""
    root, _, cfg = setup
    out, summary = finished

    def refuse(*args, **kwargs):
        raise AssertionError("a restart ran a Beam stage")

    monkeypatch.setattr(rounds.layout_stage.beam, "Pipeline", refuse)  # Any Beam job.
    again = rounds.run_rounds(cfg, out, beam_args=BEAM,
                              reference_embeddings=str(root / "ref_emb"))
    assert again == summary


def test_online_rounds_select_every_step_with_the_live_weights(setup, finished):
    """selection_mode online: the trainer scores each step's super-batch itself, from the
    same layout, writing the same manifest rows; its first step equals the offline job's."""
    root, _, cfg = setup
    out_a, _ = finished
    out = str(root / "run_online")
    summary = rounds.run_rounds(dataclasses.replace(cfg, selection_mode="online"), out,
                                beam_args=BEAM, reference_embeddings=str(root / "ref_emb"),
                                layouts=str(root / "run_a" / "layouts"))
    assert [r["examples_seen"] for r in summary["rounds"]] == [16, 32]
    assert summary["rounds"][-1]["ledger"]["learner_scoring"] > 0
    for r in range(cfg.rounds):
        rdir = os.path.join(out, "rounds", f"r{r:04d}")
        assert formats.read_json(os.path.join(rdir, "scored_by.json"))["staleness_steps"] == 0
        stats = formats.read_json(os.path.join(rdir, "selection", "stats.json"))
        assert stats["mode"] == "online"
        assert stats["selected"] + stats["rejected"] + stats["dead_lettered"] == \
            cfg.steps_per_round * cfg.super_batch_size

    def first_super_batch(run):
        manifest = os.path.join(run, "rounds", "r0000", "selection", "manifest")
        table = pa.concat_tables(formats.read_shard(s) for s in formats.list_shards(manifest))
        return table.filter(pa.compute.equal(table.column("super_batch"), 0))

    assert first_super_batch(out).equals(first_super_batch(out_a))
    with pytest.raises(ValueError, match="rescore_every"):
        dataclasses.replace(cfg, selection_mode="online", rescore_every=2)


def test_scoring_options_reach_the_scoring_jobs_only(setup, monkeypatch):
    """GPU worker options (score_beam_args) go to the reference embed and the learner-
    scoring round jobs, never to the layout; every job gets the common options."""
    root, _, cfg = setup
    calls = []
    for module, name in ((rounds.embed_stage, "run"), (rounds.layout_stage, "run_layout"),
                         (rounds.round_job, "run_round_job")):
        real = getattr(module, name)

        def record(*args, _real=real, _name=name):
            calls.append((_name, [a for a in args if isinstance(a, list)][-1]))
            return _real(*args)
        monkeypatch.setattr(module, name, record)
    marker = "--experiments=scoring_job_marker"
    rounds.run_rounds(dataclasses.replace(cfg, rounds=1), str(root / "run_options"),
                      beam_args=BEAM, score_beam_args=[marker],
                      reference_embeddings=str(root / "ref_emb"))
    assert [name for name, _ in calls] == ["run", "run_layout", "run_round_job"]
    for name, args in calls:
        assert BEAM[0] in args
        assert (marker in args) == (name != "run_layout"), name


def test_candidate_shards_align_with_rounds():
    assert rounds.round_aligned_shard_rows(512, 4, 4096) == 2048  # One shard per round.
    assert rounds.round_aligned_shard_rows(512, 50, 4096) == 5 * 512  # 10 shards per round.
    assert rounds.round_aligned_shard_rows(320, 7, 4096) == 7 * 320
    assert rounds.round_aligned_shard_rows(10_000, 4, 4096) == 10_000  # S alone is larger.
