"""README's "The pipeline, stage by stage" runs as written (issue 13), at a tiny size.

Each command of the README's block runs through `jest-curate` in a scratch directory. The
only changes are the sizes: demo-data gets a small corpus, training steps shrink (and the
checkpoint names with them), and the rounds config is the committed example with fewer
and shorter rounds. Anything else the README says must work unchanged.
"""
import json
import re
import shlex
from pathlib import Path


from jest_curate import cli

ROOT = Path(__file__).resolve().parents[1]
TINY_CORPUS = ["--pool-size", "1280", "--curated-size", "256", "--eval-size", "100",
               "--retrieval-size", "50", "--shard-size", "512"]
# README text -> tiny text. Checkpoint names follow their step counts.
TINY_STEPS = {"--steps 600": "--steps 2", "step_00000600": "step_00000002",
              "--steps 100": "--steps 3", "step_00000100": "step_00000003"}


def readme_walkthrough() -> list:
    """The commands of the first bash block under "The pipeline, stage by stage"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The pipeline, stage by stage"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _tiny(command: str) -> list:
    for readme, tiny in TINY_STEPS.items():
        command = command.replace(readme, tiny)
    argv = shlex.split(command)
    assert argv[0] == "jest-curate", command
    if argv[1] == "demo-data":
        argv += TINY_CORPUS
    return argv[1:]


def _tiny_rounds_config(scratch: Path) -> None:
    name = "jest_curate/configs/rounds_example.json"
    cfg = json.loads((ROOT / name).read_text())
    for readme, tiny in TINY_STEPS.items():
        cfg["reference_checkpoint"] = cfg["reference_checkpoint"].replace(readme, tiny)
    cfg.update(steps_per_round=2, rounds=2, warmup_steps=0, eval_max_examples=50)
    (scratch / name).parent.mkdir(parents=True)
    (scratch / name).write_text(json.dumps(cfg))


def test_the_walkthrough_names_every_stage():
    stages = [shlex.split(c)[1] for c in readme_walkthrough()]
    assert stages[0] == "demo-data" and stages[-1] == "rounds"
    assert {"ingest", "train", "embed", "layout", "round", "eval"} <= set(stages)


def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    _tiny_rounds_config(tmp_path)
    for command in readme_walkthrough():
        argv = _tiny(command)
        code = cli.main(argv)
        assert code == 0, f"{command}\n{capsys.readouterr().err[-2000:]}"
    selected = json.loads((tmp_path / "runs/r0/stats.json").read_text())
    assert selected["selected"] == 3 * 64  # Super-batches 0-2 of S = 320 (1216 rows).
    assert (tmp_path / "runs/learner/checkpoints/step_00000003.pt").exists()
    for r in range(2):  # Both rounds of the tiny rounds config finished.
        assert (tmp_path / f"runs/jest/rounds/r{r:04d}/round.json").exists()
