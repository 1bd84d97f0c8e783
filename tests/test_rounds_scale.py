"""benchmarks/rounds_scale.py runs end to end at tiny sizes and reports every figure.

The gates are the benchmark's to report (results/rounds_scale/); only that the numbers
are there and sane is checked here.
"""
import json

from benchmarks import rounds_scale
from jest_curate import cli


def test_quick_run_reports_every_measure(tmp_path, capsys):
    assert rounds_scale.main(["--quick", "--work", str(tmp_path / "work")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scales = report["scales"]
    assert scales == [1, 2] and report["round_steps"] == 2
    S, K = report["super_batch_size"], report["round_steps"]
    for k in map(str, scales):
        layout, round_, launcher = (report[x][k] for x in ("layout", "round", "launcher"))
        examples = report["pool"][k]["examples"]
        assert layout["pool"] == examples and layout["super_batches"] == examples // S
        assert layout["cpu_s"] > 0 and layout["cpu_us_per_example"] > 0
        # A fixed round: the same candidates scored and selected at every pool size.
        assert round_["seen"] == round_["scored"] == K * S
        assert round_["selected"] == K * report["batch_size"]
        assert round_["cpu_s"] > 0 and round_["read_bytes"] > 0
        assert 0 < round_["work_seconds"] < round_["wall_s"]
        assert launcher["peak_rss_mib"] > 100 and launcher["round_seen"] == K * S
    for K in report["steps"]:
        assert report["overhead"][f"K{K}"]["seen"] == K * S
        assert report["overhead"][f"K{K}"]["overhead"] > 0
    for K in report["steps"]:  # The online mode's figure beside the round job's.
        online = report["overhead"]["online"][f"K{K}"]
        assert online["online_wall_s"] > 0 and online["train_wall_s"] > 0
        assert online["work_seconds"] > 0
    assert set(report["gates"]) == {"round_cpu", "round_read_bytes", "launcher_peak_rss"}
    for gate in report["gates"].values():
        assert gate["value"] > 0 and isinstance(gate["pass"], bool)
    assert "round_cpu_2x_over_1x" in report["ratios"]
    assert cli.COMMANDS["bench-rounds"][0] == "benchmarks.rounds_scale:main"
