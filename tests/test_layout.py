"""The layout job (one pass as candidate shards) and the map-only round job."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jest_core import filtering, sampler, scores
from jest_curate import formats, hashing
from pipelines import faults, layout, round_job
from tests.conftest import file_digests
from tests.test_select import make_corpus

BEAM = ["--runner=FnApiRunner"]
S, B = 20, 8


_digests = file_digests  # Every file but metrics.json (measured seconds).


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layout"))
    corpus, ref, lrn, noisy = make_corpus(root, missing={"000003", "000040"})
    spec = layout.layout_spec(pool=corpus, reference=ref, seed=3, pass_index=0,
                              super_batch_size=S, shard_rows=2 * S)
    lay = layout.run_layout(spec, os.path.join(root, "p0"), BEAM)
    return root, corpus, ref, spec, lay


def test_a_pass_ranks_the_pool_by_hash_into_whole_super_batches(pool):
    root, corpus, ref, spec, lay = pool
    embedded = [u for s in formats.list_shards(ref) for u in formats.read_embeddings_shard(s).uids]
    want = sorted(embedded, key=lambda u: (hashing.hash_u64("pass", 3, 0, u), u))
    counts = lay.counts
    assert counts["pool_rows"] == 157 and counts["pool"] == 155
    assert counts["excluded_by_reason"] == {"not_embedded": 2}
    assert (counts["super_batches"], counts["carried"]) == (155 // S, 155 % S)
    got = []
    for shard in lay.shards:
        table = formats.read_shard(shard.info, schema=formats.CANDIDATE_SCHEMA,
                                   verify_sha256=True)
        assert table.num_rows == shard.super_batches * S  # Whole super-batches only...
        assert pq.ParquetFile(shard.info.url).num_row_groups == shard.super_batches  # one group each
        assert table.column("super_batch").to_pylist() == [
            shard.first_super_batch + i // S for i in range(table.num_rows)]
        side = formats.read_embeddings_shard(shard.reference)
        assert side.uids == table.column("uid").to_pylist()  # The sidecar is row-aligned.
        got += side.uids
    carried = formats.read_shard(os.path.join(lay.root, "carried.parquet")).column("uid")
    assert got + carried.to_pylist() == want
    assert [s.super_batches for s in lay.shards] == [2, 2, 2, 1]
    # The sidecar holds the reference's own embeddings of each row.
    by_uid = {}
    for s in formats.list_shards(ref):
        e = formats.read_embeddings_shard(s)
        by_uid.update(zip(e.uids, e.image))
    side = formats.read_embeddings_shard(lay.shards[1].reference)
    assert all(np.array_equal(by_uid[u], v) for u, v in zip(side.uids, side.image))


def test_a_layout_is_reproducible_and_never_silently_replaced(pool, tmp_path):
    root, corpus, ref, spec, lay = pool
    before = _digests(lay.root)
    assert layout.run_layout(spec, lay.root, BEAM).counts == lay.counts  # Committed: skipped.
    assert _digests(lay.root) == before
    again = layout.run_layout(spec, str(tmp_path / "p0"),
                              ["--runner=BundleBasedDirectRunner"])
    assert _digests(again.root) == before  # Byte-identical on another runner.
    with pytest.raises(ValueError, match="another pass"):
        layout.run_layout(layout.layout_spec(pool=corpus, reference=ref, seed=3, pass_index=1,
                                             super_batch_size=S, shard_rows=2 * S),
                          lay.root, BEAM)


def test_rank_order_breaks_hash_ties_by_uid():
    hashes = np.array([5, 3, 5, 3, 9], np.uint64)
    uids = ["e", "b", "a", "c", "d"]
    assert [uids[i] for i in layout.rank_order(hashes, uids)] == ["b", "c", "a", "e", "d"]


def test_a_keep_rule_filters_the_pool_and_is_accounted(pool, tmp_path):
    root, corpus, ref, _, _ = pool
    from pipelines import clip_score
    rule = clip_score.run_clip_score_rule(ref, str(tmp_path / "clip"), 0.3, BEAM)
    uids, sims = [], []
    for s in formats.list_shards(ref):
        e = formats.read_embeddings_shard(s)
        uids += e.uids
        sims.append(filtering.clip_scores(image=e.image, text=e.text))
    kept = {uids[i] for i in filtering.top_fraction(np.concatenate(sims), fraction=0.3,
                                                    keys=uids)}
    spec = layout.layout_spec(pool=corpus, reference=ref, seed=3, pass_index=0,
                              super_batch_size=S, shard_rows=2 * S, keep=rule)
    lay = layout.run_layout(spec, str(tmp_path / "kept"), BEAM)
    got = [u for s in lay.shards for u in formats.read_shard(s.info).column("uid").to_pylist()]
    got += formats.read_shard(os.path.join(lay.root, "carried.parquet")).column("uid").to_pylist()
    assert sorted(got) == sorted(kept)
    assert lay.counts["excluded_by_reason"]["filtered"] == 155 - len(kept)


def _job(lay, out, rounds=((0, 0, 3), (1, 3, 6)), method="easy-reference", **kw):
    return round_job.RoundJobConfig(
        slices=tuple(round_job.RoundSlice(r, lay.root, a, b, os.path.join(out, f"r{r}"))
                     for r, a, b in rounds),
        method=method, batch_size=B, super_batch_size=S, chunks=4, seed=1, **kw)


def test_a_round_reads_only_its_candidate_shards_and_selects_each_super_batch(pool, tmp_path):
    root, corpus, ref, spec, lay = pool
    out = str(tmp_path / "job")
    stats = round_job.run_round_job(_job(lay, out), BEAM)
    for r, (first, stop) in enumerate(((0, 3), (3, 6))):
        st = stats[r]
        assert (st["selected"], st["rejected"], st["dead_lettered"]) == (
            3 * B, 3 * (S - B), 0)
        touched = lay.shards_between(first, stop)
        metrics = formats.read_json(os.path.join(out, f"r{r}", round_job.METRICS))
        assert metrics["read_bytes"] == sum(os.path.getsize(s.info.url) + os.path.getsize(
            s.reference.url) for s in touched)  # Its shards and nothing else.
        sel = os.path.join(out, f"r{r}")
        success = formats.read_json(os.path.join(sel, "_SUCCESS"))["files"]
        for name, sha in success.items():  # Hashed as written, checked here.
            assert formats.sha256_file(os.path.join(sel, name)) == sha
        sizes = formats.read_json(os.path.join(sel, "shards", "sizes.json"))
        assert sum(sizes.values()) == 3 * B
        # Each super-batch's choice is jest_core's, from the sidecar's embeddings, and the
        # tars hold it in selection order.
        manifest = pa.concat_tables(formats.read_shard(s, schema=formats.ROUND_MANIFEST_SCHEMA)
                                    for s in formats.list_shards(os.path.join(sel, "manifest")))
        card = formats.read_model_card(ref)
        tar_uids = [x["uid"] for name in sorted(sizes)
                    for x in formats.iter_wds_samples(os.path.join(sel, "shards", name))]
        want_order = []
        for sb in range(first, stop):
            shard = next(s for s in lay.shards_between(sb, sb + 1))
            rows = formats.read_embeddings_shard(shard.reference)
            at = slice((sb - shard.first_super_batch) * S, (sb - shard.first_super_batch + 1) * S)
            pair = scores.EmbeddingPair(image=torch.from_numpy(rows.image[at].astype(np.float32)),
                                        text=torch.from_numpy(rows.text[at].astype(np.float32)),
                                        logit_scale=card.logit_scale, logit_bias=card.logit_bias)
            picked = sampler.select(
                scores.ScoringInputs(learner=None, reference=pair, num_examples=S),
                method="easy-reference", batch_size=B, num_chunks=4, temperature=1.0,
                generator=torch.Generator().manual_seed(hashing.derive_seed(1, "select", 0, sb)))
            want_order += [rows.uids[at][i] for i in picked.indices.tolist()]
            chosen = manifest.filter(pa.compute.equal(manifest.column("super_batch"), sb))
            assert chosen.num_rows == S
        assert tar_uids == want_order


def test_a_killed_round_job_reruns_to_the_same_bytes(pool, tmp_path):
    root, corpus, ref, spec, lay = pool
    clean = str(tmp_path / "clean")
    round_job.run_round_job(_job(lay, clean), BEAM)
    killed = str(tmp_path / "killed")
    plan = {"dir": str(tmp_path / "faults"), "points": {"round.write_tar": {"limit": 1}}}
    with faults.injected(plan), pytest.raises(Exception, match="InjectedFault|injected"):
        round_job.run_round_job(_job(lay, killed), BEAM)  # FnApiRunner never retries.
    assert not any(os.path.exists(os.path.join(killed, r, "_SUCCESS")) for r in ("r0", "r1"))
    round_job.run_round_job(_job(lay, killed), BEAM)
    assert _digests(killed) == _digests(clean)
    # A committed round is not redone.
    mtime = os.path.getmtime(os.path.join(killed, "r0", "_SUCCESS"))
    round_job.run_round_job(_job(lay, killed), BEAM)
    assert os.path.getmtime(os.path.join(killed, "r0", "_SUCCESS")) == mtime


def test_learner_dead_letters_are_recorded_and_the_rest_selected(tmp_path):
    """An image the learner cannot decode is dead-lettered with its reason."""
    from jest_curate import demo_data
    from training import scoring
    data = str(tmp_path / "data")
    demo_data.build_demo_corpus(data, seed=0, noise=0.5, pool_size=60, curated_size=8,
                                eval_size=8, retrieval_size=8, shard_size=30)
    pool_dir = os.path.join(data, "pool")
    shard = formats.list_shards(pool_dir)[0]
    table = formats.read_shard(shard)
    images = table.column("image").to_pylist()
    images[0] = b"not an image"
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, pa.binary()))
    broken = str(tmp_path / "broken")
    infos = [formats.write_shard(broken, shard.shard_id, table, schema=formats.CORPUS_SCHEMA)]
    infos += [formats.write_shard(broken, s.shard_id, formats.read_shard(s),
                                  schema=formats.CORPUS_SCHEMA)
              for s in formats.list_shards(pool_dir)[1:]]
    formats.write_index(broken, infos, writer="test")
    spec = layout.layout_spec(pool=broken, reference=None, seed=0, pass_index=0,
                              super_batch_size=S)
    lay = layout.run_layout(spec, str(tmp_path / "p0"), BEAM)
    out = str(tmp_path / "job")
    stats = round_job.run_round_job(round_job.RoundJobConfig(
        slices=(round_job.RoundSlice(0, lay.root, 0, 3, out),), method="hard-learner",
        batch_size=B, super_batch_size=S, chunks=4, seed=1,
        learner=scoring.ScoringSpec(model="jest-vit-micro-28")), BEAM)[0]
    assert stats["dead_lettered"] == 1 and stats["selected"] == 3 * B
    assert stats["scored"] == 3 * S - 1 and stats["scoring_flops"] > 0
    manifest = formats.read_shard(formats.list_shards(os.path.join(out, "manifest"))[0])
    dead = [r for r in manifest.to_pylist() if r["reason"].startswith("dead_letter:")]
    assert len(dead) == 1 and dead[0]["uid"] == table.column("uid")[0].as_py()


def test_a_layout_killed_mid_write_reruns_to_the_same_bytes(pool, tmp_path):
    root, corpus, ref, spec, lay = pool
    out = str(tmp_path / "p0")
    plan = {"dir": str(tmp_path / "faults"), "points": {"layout.write_candidates": {
        "after": 1, "limit": 1}}}
    with faults.injected(plan), pytest.raises(Exception, match="InjectedFault|injected"):
        layout.run_layout(spec, out, BEAM)
    assert not os.path.exists(os.path.join(out, formats.LAYOUT_FILE))  # Not committed.
    assert _digests(layout.run_layout(spec, out, BEAM).root) == _digests(lay.root)


def test_dataflow_dry_run_builds_the_layout_and_round_jobs_and_runs_nothing(
        pool, tmp_path, monkeypatch, capsys):
    """docs/dataflow.md's check: `--dry_run=True` on DataflowRunner builds the job offline
    and the stage says so, instead of failing to read outputs nothing wrote."""
    import socket
    root, corpus, ref, spec, lay = pool

    def no_network(self, address, *args):
        raise OSError(f"test forbids network access ({address})")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    dataflow = ["--runner", "DataflowRunner", "--dry_run=True", "--project", "jest-demo",
                "--region", "us-central1", "--temp_location", "gs://jest-demo/dataflow/tmp",
                "--staging_location", "gs://jest-demo/dataflow/staging"]
    out = tmp_path / "p0"
    assert layout.run(["--corpus", corpus, "--reference-embeddings", ref, "--output",
                       str(out), "--seed", "3", "--super-batch-size", str(S)] + dataflow) == 0
    assert "dry run" in capsys.readouterr().out and not os.path.exists(out / "layout.json")
    assert round_job.run(["--layout", lay.root, "--super-batches", "0:3", "--output",
                          str(tmp_path / "r0"), "--method", "easy-reference",
                          "--batch-size", str(B)] + dataflow) == 0
    assert "dry run" in capsys.readouterr().out and not os.path.exists(tmp_path / "r0" / "_SUCCESS")
