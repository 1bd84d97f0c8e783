"""`jest-curate demo`: the whole product on real photos, offline, in minutes.

Builds the Fashion-MNIST demo corpus if missing, trains the reference model on the
curated set, runs `rounds` for every method at every budget (each run with its own full
learning-rate schedule) and seed, all methods through the same select stage, and writes
OUTPUT/report/: budget-matched iso-accuracy speedups in examples and FLOPs (all-in and
reference-amortised) with bootstrap intervals over seeds (jest_curate/report.py).
`--full` runs the study behind the README's headline (more seeds, longer budgets, more
methods and levers); it may take hours.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from jest_curate import demo_data
from jest_curate import formats
from jest_curate import hashing
from jest_curate import progress as progress_lib
from jest_curate import report as report_lib
from pipelines import options
from pipelines import rounds as rounds_lib
from training import early_stopping
from training import train as train_lib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jest_curate" / "configs"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    model: str
    steps: int
    batch_size: int
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    precision: str = "auto"
    # Held-out early stopping (training/early_stopping.py): `steps` is then the most it
    # may train; every `eval_every` steps the held-out SigLIP loss (holdout_fraction of
    # the curated set, never the test split) is measured, and training stops after
    # `patience` evaluations without improvement. eval_every 0: train all `steps`.
    holdout_fraction: float = 0.1
    eval_every: int = 0
    patience: int = 3
    # Multi-resolution training (FlexiViT), so a low-resolution scoring setting
    # (score_image_size) reads a reference that was trained there too.
    low_res_size: Optional[int] = None
    low_res_fraction: float = 0.0


_CORPUS_SIZES = ("pool_size", "curated_size", "eval_size", "retrieval_size", "shard_size")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """A committed study: data, reference, and the rounds every method runs."""
    seeds: tuple
    methods: tuple
    noise: float
    reference: dict
    run: dict  # RunConfig fields shared by every method (no name/seed/method/paths).
    data_seed: int = 0
    # name -> {method, RunConfig overrides, optionally its own "budget_steps"}; a variant
    # named like a method replaces it (e.g. uniform with larger budgets, so the target
    # accuracy is uniform's at a budget the selecting methods only need a part of).
    variants: dict = dataclasses.field(default_factory=dict)
    corpus: dict = dataclasses.field(default_factory=dict)  # demo_data.build_demo_corpus sizes
    # Delete a finished run's intermediate learner checkpoints (step 0 and the last stay).
    prune_checkpoints: bool = True
    # Training budgets in steps: every method runs once per budget (and seed), each run
    # with its own full schedule. Empty: one budget, the run's rounds x steps_per_round.
    budget_steps: tuple = ()

    @classmethod
    def load(cls, path: str) -> "DemoConfig":
        cfg = formats.load_dataclass(cls, formats.read_json(path), path)
        formats.load_dataclass(ReferenceConfig, cfg.reference, f"{path} reference")
        unknown = set(cfg.corpus) - set(_CORPUS_SIZES)
        if unknown:
            raise ValueError(f"{path}: corpus keys {sorted(unknown)} not in {_CORPUS_SIZES}")
        return cfg


def _reference(cfg: DemoConfig, data: str, out: str) -> dict:
    """Trains (or resumes) the reference; {"checkpoint", "training_flops", "eval", ...}."""
    ref = formats.load_dataclass(ReferenceConfig, cfg.reference, "reference")
    curated = formats.join_url(data, "curated")
    train_cfg = train_lib.TrainConfig(
        model=ref.model, output=out, data=curated,
        data_format="canonical", batch_size=ref.batch_size, total_steps=ref.steps,
        learning_rate=ref.learning_rate, warmup_steps=ref.warmup_steps, precision=ref.precision,
        seed=hashing.derive_seed(cfg.data_seed, "reference_init"), resume=True,
        low_res_size=ref.low_res_size, low_res_fraction=ref.low_res_fraction,
        tensorboard=False)
    if ref.eval_every:
        split = early_stopping.split_holdout(curated, os.path.join(out, "data"),
                                             fraction=ref.holdout_fraction,
                                             seed=hashing.derive_seed(cfg.data_seed, "holdout"))
        record = early_stopping.train_with_early_stopping(
            dataclasses.replace(train_cfg, data=split["train"]), holdout=split["holdout"],
            eval_every=ref.eval_every, patience=ref.patience)
        info = {"checkpoint": record["best_checkpoint"], "training_flops": record["flops"],
                "early_stopping": {k: record[k] for k in (
                    "best_step", "best_holdout_loss", "stopped_at_step", "stopped_early",
                    "history", "training_flops", "holdout_flops")},
                "holdout_split": split["counts"]}
    else:
        result = train_lib.train(train_cfg)
        info = {"checkpoint": result.checkpoint, "training_flops": result.flops}
    eval_url = os.path.join(out, "eval.json")
    if not os.path.exists(eval_url):
        eval_data = rounds_lib.eval_data(formats.join_url(data, "eval"),
                                         cfg.run.get("eval_max_examples"))
        formats.write_json_atomic(eval_url, rounds_lib.evaluate_checkpoint(info["checkpoint"],
                                                                           eval_data))
    return {**info, "eval": formats.read_json(eval_url)}


def parse_part(text: str) -> tuple:
    """"I/N" -> (I, N): this process runs every N-th (variant, seed) run, from the I-th."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part wants I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--part {text}: need 0 <= I < N")
    return index, count


def run_demo(config_path: str, output: str, beam_args=(), part: Optional[tuple] = None,
             score_device: str = "cpu", report: Optional[str] = None, part_count: int = 1):
    """Runs the study (resuming what is done) and returns summary.json's contents.

    With `part=(I, N)` only runs I, I+N, I+2N, ... (in config order) are run and no report
    is written (returns None): N processes, started once the reference exists, share one
    output; a final call without `part` resumes the finished runs and writes the report
    (to `report`, default OUTPUT/report; `part_count` records how many processes ran it).
    Studies with the same data and reference may share an output and so their runs.
    """
    cfg = DemoConfig.load(config_path)
    data = os.path.join(output, "data")
    with _timed(os.path.join(output, "data_timing.json"),
                done=os.path.exists(os.path.join(data, "demo.json"))):
        demo_data.build_demo_corpus(data, seed=cfg.data_seed, noise=cfg.noise, **cfg.corpus)
    with _timed(os.path.join(output, "reference", "timing.json"),
                done=os.path.exists(os.path.join(output, "reference", "eval.json"))):
        reference = _reference(cfg, data, os.path.join(output, "reference"))
    log.info("reference: %s", reference["eval"])
    print(f"reference: zero-shot {reference['eval'][report_lib.METRIC]:.3f}", flush=True)
    runs = {}
    for i, (name, steps, seed, fields) in enumerate(plan_runs(cfg)):
        run_dir = os.path.join(output, "runs", f"{name}-b{steps}-s{seed}")
        runs.setdefault(name, {}).setdefault(steps, []).append(run_dir)
        if part is not None and i % part[1] != part[0]:
            continue
        run_cfg = formats.RunConfig(**{
            **fields, "name": f"{name}-b{steps}-s{seed}", "seed": seed,
            "pool": formats.join_url(data, "pool"),
            "reference_checkpoint": reference["checkpoint"],
            "reference_training_flops": reference["training_flops"],
            "eval_data": formats.join_url(data, "eval")})
        log.info("running %s", run_cfg.name)
        with _timed(os.path.join(run_dir, "timing.json"),
                    done=os.path.exists(os.path.join(run_dir, "summary.json"))):
            rounds_lib.run_rounds(
                run_cfg, run_dir, beam_args=beam_args, score_device=score_device,
                reference_embeddings=os.path.join(output, "reference_embeddings"),
                layouts=os.path.join(output, "layouts"),
                progress=progress_lib.RoundProgress(run_cfg.rounds,
                                                    label=f"{run_cfg.name}: "))
        if cfg.prune_checkpoints:
            prune_checkpoints(os.path.join(run_dir, "learner"))
    if part is not None:
        return None
    timings = [os.path.join(output, "data_timing.json"),
               os.path.join(output, "reference", "timing.json")] + [
        os.path.join(d, "timing.json") for budgets in runs.values() for dirs in budgets.values()
        for d in dirs]
    timings = [formats.read_json(t) for t in timings if os.path.exists(t)]
    return report_lib.write_report(
        report or os.path.join(output, "report"), runs=runs,
        reference=reference,
        noise_dir=os.path.join(data, "ground_truth", "noise"),
        settings={"config": os.path.basename(config_path), **dataclasses.asdict(cfg),
                  "wall_seconds": round(sum(t["wall_seconds"] for t in timings), 1),
                  "elapsed_seconds": _round(elapsed_seconds(timings)),
                  "processes": part_count,
                  "machine": _machine()})


@contextlib.contextmanager
def _timed(url: str, done: bool = False):
    """Records the body's wall seconds at `url`, added to what earlier (interrupted)
    calls recorded there, so a resumed study still sums its real time, and its
    [start, end] in Unix seconds, so the study's elapsed time is the union of its pieces'
    intervals even when `--part` processes ran them side by side. A piece already `done`
    (only checked, e.g. by the call that writes the report) records nothing."""
    if done:
        yield
        return
    before = formats.read_json(url) if os.path.exists(url) else {}
    start, clock = time.time(), time.perf_counter()
    try:
        yield
    finally:
        formats.write_json_atomic(url, {
            "wall_seconds": before.get("wall_seconds", 0.0) + time.perf_counter() - clock,
            "intervals": before.get("intervals", []) + [[round(start, 3),
                                                          round(time.time(), 3)]],
            # Float sums, so a run's bytes, depend on the thread count.
            "torch_threads": sorted(set(before.get("torch_threads", []))
                                    | {torch.get_num_threads()})})


def elapsed_seconds(timings: list) -> Optional[float]:
    """Length of the union of the recorded intervals: wall time while any piece ran. None
    when a piece was timed without intervals (an older study)."""
    intervals = []
    for t in timings:
        if "intervals" not in t:
            return None
        intervals += t["intervals"]
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def prune_checkpoints(learner_dir: str) -> int:
    """Deletes a finished run's intermediate learner checkpoints (they only served its
    rounds' scoring and resume), keeping step 0 (a resumed run checks it) and the last.
    Returns how many it removed. A 1,600-step study run would otherwise keep 1.2 GB."""
    root = os.path.join(learner_dir, "checkpoints")
    steps = sorted(f for f in os.listdir(root) if f.startswith("step_") and f.endswith(".pt"))
    for name in steps[1:-1]:
        os.remove(os.path.join(root, name))
    return max(len(steps) - 2, 0)


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 1)


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def plan_runs(cfg: DemoConfig) -> list:
    """[(variant name, budget steps, seed, RunConfig fields)] in config order.

    Each budget is its own run (rounds = steps / steps_per_round), so its learning-rate
    schedule spans exactly that budget.
    """
    variants = {m: {"method": m} for m in cfg.methods}
    variants.update(cfg.variants)
    plan = []
    for name, variant in variants.items():
        variant = dict(variant)
        own_budgets = variant.pop("budget_steps", None)  # A variant may add budgets.
        fields = {**cfg.run, **variant}
        k = fields["steps_per_round"]
        budgets = own_budgets or cfg.budget_steps or (fields["rounds"] * k,)
        for steps in budgets:
            if steps % k:
                raise ValueError(f"budget of {steps} steps is not a whole number of rounds of "
                                 f"{k} steps (variant {name})")
            plan += [(name, steps, seed, {**fields, "rounds": steps // k})
                     for seed in cfg.seeds]
    return plan


def run(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jest-curate demo", description=__doc__.split("\n")[0])
    p.add_argument("--output", default="demo_out", help="demo directory (resumed if present)")
    p.add_argument("--full", action="store_true", help="the full study (hours)")
    p.add_argument("--config", help="a demo config JSON (default: the committed one)")
    p.add_argument("--score-device", choices=("cpu", "cuda"), default="cpu",
                   help="where the Beam stages score (the trainer uses a GPU when present)")
    p.add_argument("--part", type=parse_part, metavar="I/N",
                   help="run only every N-th run from the I-th and skip the report, to split "
                        "a study over N processes sharing --output (start them after the "
                        "reference is trained; rerun without --part to write the report)")
    p.add_argument("--report", help="report directory (default OUTPUT/report), e.g. for a "
                                     "lever study sharing a headline study's output")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="how many --part processes ran the study (recorded in the report)")
    progress_lib.add_verbose_flag(p)
    args, beam_args = options.parse_stage_args(p, argv)
    progress_lib.configure_logging(os.path.join(args.output, "log.txt"), verbose=args.verbose)
    config = args.config or str(CONFIG_DIR / ("demo_full.json" if args.full else "demo.json"))
    summary = run_demo(config, args.output, beam_args=beam_args or ["--runner=FnApiRunner"],
                       part=args.part, score_device=args.score_device, report=args.report,
                       part_count=args.processes)
    if summary is None:
        print("part %s/%s done; rerun without --part to write the report" % args.part)
        return 0
    print(report_lib.render_table(summary))
    print(json.dumps({k: summary[k] for k in ("examples_speedup", "flops_speedup",
                                              "reference_zero_shot", "learner_beats_reference")}))
    return 0
