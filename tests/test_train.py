"""The companion trainer: data order, schedule, resume, rounds, checkpoints, FLOPs.

Tiny runs of jest-vit-micro-28 on the CPU in fp32 over synthetic image-text pairs
(a colour and a shape per image, both named in the caption).
"""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageDraw

from jest_curate import formats
from training import data as data_lib
from training import main as main_lib
from training import model as model_lib
from training import train as train_lib
from training.flops import forward_flops
from training.schedule import warmup_cosine_lr

MODEL = "jest-vit-micro-28"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (230, 220, 40), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("square", "circle", "bar")


def _image(colour: str, shape: str, fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (28, 28), (128, 128, 128))
    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    {"square": lambda: draw.rectangle((6, 6, 21, 21), fill=fill),
     "circle": lambda: draw.ellipse((5, 5, 22, 22), fill=fill),
     "bar": lambda: draw.rectangle((2, 11, 25, 16), fill=fill)}[shape]()
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rows(n: int, start: int = 0) -> list:
    names = list(COLOURS)
    rows = []
    for i in range(start, start + n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        rows.append({"uid": f"{i:08x}", "image": _image(colour, shape),
                     "caption": f"a {colour} {shape} number {i}"})
    return rows


def _write_curated(root, shards: list) -> str:
    """A curated shard directory as selection writes it: one list of rows per tar."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for index, rows in enumerate(shards):
        blob = b"".join(formats.encode_wds_sample(
            uid=r["uid"], image=r["image"], image_format="png", caption=r["caption"],
            metadata={"uid": r["uid"], "position": i}) for i, r in enumerate(rows))
        name = f"{index:05d}.tar"
        (root / name).write_bytes(blob + formats.TAR_END)
        sizes[name] = len(rows)
    (root / "sizes.json").write_text(json.dumps(sizes))
    return str(root)


def _write_canonical(root, rows: list, per_shard: int) -> str:
    for s in range(0, len(rows), per_shard):
        part = rows[s:s + per_shard]
        table = pa.table({
            "uid": [r["uid"] for r in part], "image": [r["image"] for r in part],
            "image_format": ["png"] * len(part), "caption": [r["caption"] for r in part],
            "source": ["test"] * len(part), "source_location": ["test"] * len(part),
            "url": [None] * len(part), "license": [None] * len(part)},
            schema=formats.CORPUS_SCHEMA)
        formats.write_shard(str(root), f"{s // per_shard:05d}", table,
                            schema=formats.CORPUS_SCHEMA)
    return str(root)


def _config(tmp_path, name, data, **kw) -> train_lib.TrainConfig:
    base = dict(model=MODEL, output=str(tmp_path / name), data=data, batch_size=4,
                total_steps=6, learning_rate=2e-3, warmup_steps=2, precision="fp32",
                device="cpu", num_threads=1, tensorboard=False)
    base.update(kw)
    return train_lib.TrainConfig(**base)


def _assert_same_state(url_a: str, url_b: str,
                       counters=("examples_seen", "flops", "data_position", "torch_rng_state")):
    a, b = formats.load_checkpoint(url_a), formats.load_checkpoint(url_b)
    assert a.step == b.step
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    state_a, state_b = a.optimizer["state"], b.optimizer["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name in state_a[key]:
            assert torch.equal(state_a[key][name], state_b[key][name]), (key, name)
    for field in counters:
        assert a.extra[field] == b.extra[field], field


# --------------------------------------------------------------------------- schedule

def test_schedule_warms_up_then_follows_the_cosine_over_the_whole_run():
    lrs = [warmup_cosine_lr(s, base_lr=1.0, warmup_steps=4, total_steps=14) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[14] == 0.0
    assert lrs[9] == pytest.approx(0.5)  # Half-way through the decay.
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert warmup_cosine_lr(14, base_lr=1.0, warmup_steps=0, total_steps=14,
                            min_lr=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        warmup_cosine_lr(0, base_lr=1.0, warmup_steps=5, total_steps=4)


# --------------------------------------------------------------------------- data

def test_curated_batches_are_the_written_order_cut_every_b(tmp_path):
    rows = _rows(12)
    url = _write_curated(tmp_path / "c", [rows[:5], rows[5:8], rows[8:]])
    source = data_lib.CuratedShards(url, batch_size=3)
    assert source.num_batches == 4
    batches = [[e.uid for e in b] for b in source.batches()]
    assert batches == [[r["uid"] for r in rows[i:i + 3]] for i in range(0, 12, 3)]
    # Resuming at batch 2 starts mid-shard (sample 6 of shard 1) without replaying.
    assert [[e.uid for e in b] for b in source.batches(2)] == batches[2:]
    assert next(source.batches(1))[0].caption == rows[3]["caption"]
    with pytest.raises(data_lib.DataError, match="not a multiple of batch size 5"):
        data_lib.CuratedShards(url, batch_size=5)


def _tar_with(tmp_path, members) -> str:
    root = tmp_path / "bad"
    root.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    (root / "00000.tar").write_bytes(buf.getvalue())
    (root / "sizes.json").write_text(json.dumps({"00000.tar": 1}))
    return str(root)


PNG = _image("red", "square")


@pytest.mark.parametrize("members,match", [
    ([("../evil.png", PNG, "file"), ("../evil.txt", b"x", "file")], "refusing tar member"),
    ([("/abs.png", PNG, "file"), ("/abs.txt", b"x", "file")], "refusing tar member"),
    ([("aa.png", b"", "symlink"), ("aa.txt", b"x", "file")], "refusing tar member"),
    ([("aa.png", PNG, "file")], "incomplete"),
    ([("aa.png", PNG, "file"), ("aa.txt", b"x", "file"), ("bb.png", PNG, "file"),
      ("bb.txt", b"x", "file"), ("aa.json", b"{}", "file")], "not contiguous"),
    ([("aa.png", PNG, "file"), ("aa.txt", b"\xff\xfe", "file")], "corrupt curated shard"),
])
def test_unsafe_or_broken_tars_are_clear_errors(tmp_path, members, match):
    source = data_lib.CuratedShards(_tar_with(tmp_path, members), batch_size=1)
    with pytest.raises(data_lib.DataError, match=match):
        list(source.batches())


def test_sizes_json_must_agree_with_the_shards(tmp_path):
    url = _write_curated(tmp_path / "c", [_rows(4)])
    (tmp_path / "c" / "sizes.json").write_text(json.dumps({"00000.tar": 5}))
    with pytest.raises(data_lib.DataError, match="sizes.json says 5"):
        list(data_lib.CuratedShards(url, batch_size=1).batches())
    (tmp_path / "c" / "sizes.json").write_text(json.dumps({"00001.tar": 4}))
    with pytest.raises(data_lib.DataError, match="lists"):
        data_lib.CuratedShards(url, batch_size=1)
    (tmp_path / "c" / "sizes.json").unlink()
    with pytest.raises(data_lib.DataError, match="no sizes.json"):
        data_lib.CuratedShards(url, batch_size=1)


def test_canonical_batches_are_seeded_epochs_without_repeats(tmp_path):
    url = _write_canonical(tmp_path / "corpus", _rows(22), per_shard=5)
    source = data_lib.CanonicalBatches(url, batch_size=4, seed=7, window_shards=2)
    assert source.batches_per_epoch == 5  # 22 // 4; two examples sit out each epoch.
    it = source.batches()
    batches = [[e.uid for e in next(it)] for _ in range(15)]
    for epoch in range(3):
        uids = [u for b in batches[epoch * 5:(epoch + 1) * 5] for u in b]
        assert len(set(uids)) == 20
    assert batches[:5] != batches[5:10]  # Reshuffled every epoch.
    again = data_lib.CanonicalBatches(url, batch_size=4, seed=7, window_shards=2)
    resumed = again.batches(7)
    assert [[e.uid for e in next(resumed)] for _ in range(8)] == batches[7:]
    other = data_lib.CanonicalBatches(url, batch_size=4, seed=8, window_shards=2).batches()
    assert [[e.uid for e in next(other)] for _ in range(5)] != batches[:5]


def test_undecodable_images_are_dropped_and_counted(tmp_path):
    rows = _rows(8)
    rows[2]["image"] = b"not an image"
    url = _write_curated(tmp_path / "c", [rows])
    result = train_lib.train(_config(tmp_path, "run", url, total_steps=2))
    ckpt = formats.load_checkpoint(result.checkpoint)
    assert ckpt.extra["dropped"] == {"undecodable_image": 1}
    assert result.examples_seen == 7


# --------------------------------------------------------------------------- training

def _encode_rows(checkpoint: str, rows: list):
    """(model, batch, image features, text features) of `rows` under a checkpoint."""
    model, cfg, _, _ = model_lib.model_from_checkpoint(checkpoint)
    batch = data_lib.prepare_batch(
        [data_lib.Example(r["uid"], r["image"], r["caption"]) for r in rows],
        model_lib.preprocess_contract(cfg))
    with torch.no_grad():
        image, text = model_lib.encode(model, batch.images, batch.tokens)
    return model, batch, image, text


def _batch_loss(checkpoint: str, rows: list) -> float:
    from open_clip.loss import SigLipLoss
    model, _, image, text = _encode_rows(checkpoint, rows)
    with torch.no_grad():
        return float(SigLipLoss()(image, text, model.logit_scale.exp(), model.logit_bias))


def test_a_few_steps_reduce_the_loss_and_write_loadable_checkpoints(tmp_path):
    rows = _rows(36)
    url = _write_curated(tmp_path / "c", [rows[:18], rows[18:]])
    result = train_lib.train(_config(tmp_path, "run", url, batch_size=12, total_steps=3,
                                     learning_rate=5e-3, warmup_steps=0, checkpoint_every=1))
    assert result.step == 3 and result.examples_seen == 36
    step0 = train_lib.checkpoint_url(str(tmp_path / "run"), 0)
    assert _batch_loss(result.checkpoint, rows[:12]) < 0.8 * _batch_loss(step0, rows[:12])
    # Every checkpoint loads the way `jest-curate embed` loads it.
    for step in range(4):
        url_s = train_lib.checkpoint_url(str(tmp_path / "run"), step)
        model, cfg, name, sha = model_lib.model_from_checkpoint(url_s, model=MODEL)
        assert name == MODEL and sha == formats.sha256_file(url_s)
    latest = formats.read_json(str(tmp_path / "run" / "checkpoints" / "latest.json"))
    assert latest["step"] == 3 and latest["checkpoint"] == "step_00000003.pt"
    assert latest["flops"] == result.flops > 0


def test_step0_checkpoint_is_the_model_that_trains(tmp_path):
    url = _write_curated(tmp_path / "c", [_rows(8)])
    # Writing step 0 alone (as the rounds stage does before scoring round 0)...
    only0 = train_lib.train(_config(tmp_path, "a", None, stop_at_step=0))
    assert only0.step == 0 and only0.checkpoint.endswith("step_00000000.pt")
    # ...then training from it equals training from scratch in one call.
    train_lib.train(_config(tmp_path, "a", url, stop_at_step=2, resume=True))
    train_lib.train(_config(tmp_path, "b", url, stop_at_step=2))
    _assert_same_state(train_lib.checkpoint_url(str(tmp_path / "a"), 2),
                       train_lib.checkpoint_url(str(tmp_path / "b"), 2))


def test_resume_equals_an_uninterrupted_run(tmp_path):
    rows = _rows(24)
    url = _write_curated(tmp_path / "c", [rows[:10], rows[10:]])
    straight = train_lib.train(_config(tmp_path, "straight", url))
    train_lib.train(_config(tmp_path, "resumed", url, stop_at_step=3))
    resumed = train_lib.train(_config(tmp_path, "resumed", url, resume=True))
    assert resumed.step == straight.step == 6
    assert resumed.flops == straight.flops and resumed.examples_seen == 24
    _assert_same_state(straight.checkpoint, resumed.checkpoint)


def test_rounds_continue_one_run_across_shard_directories(tmp_path):
    """Round 1 on shards A, round 2 on shards B == one run over A then B."""
    rows = _rows(24)
    a = _write_curated(tmp_path / "a", [rows[:12]])
    b = _write_curated(tmp_path / "b", [rows[12:20], rows[20:]])
    both = _write_curated(tmp_path / "ab", [rows[:12], rows[12:20], rows[20:]])
    straight = train_lib.train(_config(tmp_path, "straight", both))
    train_lib.train(_config(tmp_path, "rounds", a, stop_at_step=3))
    rounds = train_lib.train(_config(tmp_path, "rounds", b, resume=True))
    _assert_same_state(straight.checkpoint, rounds.checkpoint,
                       counters=("examples_seen", "flops", "torch_rng_state"))
    # Round 2's position counts batches of its own shards.
    assert formats.load_checkpoint(rounds.checkpoint).extra["data_position"] == {
        "url": b, "batches": 3}


def test_canonical_random_batches_resume_bit_for_bit_with_multi_resolution(tmp_path):
    url = _write_canonical(tmp_path / "corpus", _rows(18), per_shard=7)
    kw = dict(total_steps=6, low_res_size=14, low_res_fraction=0.5)
    straight = train_lib.train(_config(tmp_path, "straight", url, **kw))
    train_lib.train(_config(tmp_path, "resumed", url, stop_at_step=4, **kw))
    resumed = train_lib.train(_config(tmp_path, "resumed", url, resume=True, **kw))
    _assert_same_state(straight.checkpoint, resumed.checkpoint)
    # Half of each batch at 14 px costs fewer FLOPs than all of it at 28 px.
    full = train_lib.train(_config(tmp_path, "full", url, total_steps=6))
    assert straight.flops < full.flops
    ckpt = formats.load_checkpoint(straight.checkpoint)
    step0 = formats.load_checkpoint(train_lib.checkpoint_url(str(tmp_path / "straight"), 0))
    # Low-resolution examples train the shared position table through the resampling.
    assert not torch.equal(ckpt.state_dict["visual.positional_embedding"],
                           step0.state_dict["visual.positional_embedding"])


def test_multi_resolution_needs_a_vit_and_a_patch_multiple(tmp_path):
    with pytest.raises(ValueError, match="multiple of the patch size 7"):
        train_lib.Trainer(_config(tmp_path, "x", None, stop_at_step=0, low_res_size=10,
                                  low_res_fraction=0.5))
    with pytest.raises(ValueError, match="ViT image tower"):
        train_lib.Trainer(_config(tmp_path, "y", None, stop_at_step=0, model="jest-resnet-tiny-64",
                                  low_res_size=32, low_res_fraction=0.5))


def test_step_flops_are_measured_forward_plus_backward(tmp_path):
    url = _write_curated(tmp_path / "c", [_rows(8)])
    result = train_lib.train(_config(tmp_path, "run", url, batch_size=8, total_steps=1,
                                     warmup_steps=0))
    ckpt = formats.load_checkpoint(result.checkpoint)
    model, cfg, _, _ = model_lib.model_from_checkpoint(result.checkpoint)
    batch = data_lib.prepare_batch(
        [data_lib.Example(r["uid"], r["image"], r["caption"]) for r in _rows(8)],
        model_lib.preprocess_contract(cfg))
    forward = forward_flops(model, batch.images, batch.tokens)
    # Backward costs about twice the forward pass (input and weight gradients).
    assert 2.5 * forward < result.flops < 3.5 * forward
    assert ckpt.extra["flops_per_example_train"] == result.flops / 8


def test_step0_and_trained_checkpoints_run_through_jest_curate_embed(tmp_path):
    from pipelines import embed
    rows = _rows(8)
    corpus = _write_canonical(tmp_path / "corpus", rows, per_shard=8)
    result = train_lib.train(_config(tmp_path, "run", corpus, total_steps=2, warmup_steps=0))
    for step in (0, 2):
        checkpoint = train_lib.checkpoint_url(str(tmp_path / "run"), step)
        output = tmp_path / f"emb{step}"
        embed.run(["--corpus", corpus, "--model", MODEL, "--checkpoint", checkpoint,
                   "--output", str(output), "--runner=FnApiRunner", "--num-threads", "1"])
        card = formats.read_model_card(str(output))
        assert card.checkpoint_sha256 == formats.sha256_file(checkpoint)
        emb = formats.read_embeddings_shard(formats.list_shards(str(output))[0],
                                            expect_model_digest=card.model_digest)
        _, batch, image, text = _encode_rows(checkpoint, rows)
        assert emb.uids == batch.uids
        np.testing.assert_allclose(emb.image.astype(np.float32), image.numpy(), atol=2e-3)
        np.testing.assert_allclose(emb.text.astype(np.float32), text.numpy(), atol=2e-3)
    assert result.step == 2


# --------------------------------------------------------------------------- errors

def test_corrupt_or_mismatched_checkpoints_are_clear_errors(tmp_path):
    url = _write_curated(tmp_path / "c", [_rows(8)])
    train_lib.train(_config(tmp_path, "run", url, stop_at_step=1))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train_lib.train(_config(tmp_path, "run", url))
    with pytest.raises(formats.CheckpointError, match="change the run's settings"):
        train_lib.train(_config(tmp_path, "run", url, resume=True, learning_rate=1.0))
    with pytest.raises(formats.CheckpointError, match="another model config"):
        train_lib.train(_config(tmp_path, "run", url, resume=True, model="jest-vit-tiny-32"))
    newest = train_lib.checkpoint_url(str(tmp_path / "run"), 1)
    data = (tmp_path / "run" / "checkpoints" / "step_00000001.pt").read_bytes()
    (tmp_path / "run" / "checkpoints" / "step_00000001.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(formats.CheckpointError, match="not a readable torch checkpoint"):
        train_lib.train(_config(tmp_path, "run", url, resume=True))
    with pytest.raises(formats.CheckpointError):
        model_lib.model_from_checkpoint(newest)
    # A checkpoint of another architecture does not load into the model it claims.
    step0 = train_lib.checkpoint_url(str(tmp_path / "run"), 0)
    with pytest.raises(ValueError, match="differs"):
        model_lib.model_from_checkpoint(step0, model="jest-vit-tiny-32")


def test_too_few_curated_batches_is_an_error_before_training(tmp_path):
    url = _write_curated(tmp_path / "c", [_rows(8)])
    with pytest.raises(data_lib.DataError, match="need 6"):
        train_lib.train(_config(tmp_path, "run", url))
    assert train_lib.latest_checkpoint(str(tmp_path / "run")).endswith("step_00000000.pt")


# --------------------------------------------------------------------------- CLI

def test_train_cli_defaults_steps_to_the_curated_batches_and_logs_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    url = _write_curated(tmp_path / "c", [_rows(8)])
    out = tmp_path / "run"
    code = main_lib.train_main(["--shards", url, "--model", MODEL, "--output", str(out),
                                "--batch-size", "4", "--precision", "fp32", "--device", "cpu",
                                "--num-threads", "1"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 2 and printed["examples_seen"] == 8
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag in ("train/loss", "train/lr", "train/examples_seen", "train/flops"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert events.Scalars("train/examples_seen")[-1].value == 8
    code = main_lib.train_main(["--shards", url, "--model", MODEL, "--output", str(out),
                                "--batch-size", "4"])
    assert code == 2 and "already holds checkpoints" in capsys.readouterr().err


def test_cli_parses_kebab_case_flags():
    args = main_lib.parse_train_args(["--shards", "s", "--model", MODEL, "--output", "o",
                                      "--steps", "10", "--stop-at-step", "4", "--low-res-size",
                                      "14", "--low-res-fraction", "0.5", "--resume"])
    cfg = main_lib._train_config(args)
    assert (cfg.total_steps, cfg.stop, cfg.low_res_size, cfg.resume) == (10, 4, 14, True)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")])
def test_auto_precision_picks_bf16_on_cpu_only_with_amx(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    assert train_lib.resolve_precision("auto", torch.device("cpu")) == expected
    assert train_lib.resolve_precision("fp32", torch.device("cpu")) == "fp32"
