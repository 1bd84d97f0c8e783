"""What a person sees (issue 15, item 7): a line per round, quiet logs, the log file."""
import dataclasses
import io
import logging
import os

from jest_curate import progress
from pipelines import rounds
from tests.test_rounds import BEAM, finished, setup  # noqa: F401 (fixtures)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_one_line_per_round_with_eval_elapsed_and_eta():
    clock, out = _Clock(), io.StringIO()
    show = progress.RoundProgress(4, label="jest: ", stream=out, clock=clock)
    clock.now = 0.2
    show({"round": 0, "examples_seen": 6400}, resumed=True)
    clock.now = 30
    show({"round": 1, "examples_seen": 12800, "eval": {"zeroshot_top1": 0.4123}})
    clock.now = 90
    show({"round": 2, "examples_seen": 19200})
    clock.now = 3700
    show({"round": 3, "examples_seen": 25600, "eval": {"zeroshot_top1": 0.5}})
    assert out.getvalue().splitlines() == [
        "jest: round 1/4 | 6,400 examples | resumed",
        "jest: round 2/4 | 12,800 examples | zero-shot 0.412 | 30s elapsed | ETA 1m00s",
        "jest: round 3/4 | 19,200 examples | 1m30s elapsed | ETA 45s",
        "jest: round 4/4 | 25,600 examples | zero-shot 0.500 | 1h01m elapsed"]


def test_logs_stay_out_of_the_terminal_but_reach_the_file(tmp_path, capsys):
    log_file = tmp_path / "run" / "log.txt"
    try:
        progress.configure_logging(str(log_file), verbose=False)
        logging.getLogger("apache_beam.runners").info("a Beam INFO line")
        logging.getLogger("training.train").warning("a warning")
        assert "a Beam INFO line" not in capsys.readouterr().err
        progress.configure_logging(str(log_file), verbose=True)  # Replaces, not adds.
        logging.getLogger("training.train").info("a trainer INFO line")
        err = capsys.readouterr().err
        assert err.count("a trainer INFO line") == 1
        text = log_file.read_text()
        assert "a Beam INFO line" in text and "a warning" in text and "trainer INFO" in text
    finally:
        for h in [h for h in logging.getLogger().handlers
                  if getattr(h, progress._OURS, False)]:
            logging.getLogger().removeHandler(h)


def test_rounds_report_each_round_as_it_finishes(setup, finished, capsys):  # noqa: F811
    root, _, cfg = setup
    out, summary = finished  # Every round is on disk: a resumed run reports them as such.
    rounds.run_rounds(cfg, out, beam_args=BEAM, reference_embeddings=str(root / "ref_emb"),
                      progress=progress.RoundProgress(cfg.rounds))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["round 1/2", "round 2/2"]
    assert all(line.endswith("resumed") for line in lines)
    last = summary["rounds"][-1]
    assert f"{last['examples_seen']:,} examples" in lines[-1]
    assert f"zero-shot {last['eval']['zeroshot_top1']:.3f}" in lines[-1]
