"""A typo is an error (issue 13): every CLI stops on a flag that neither it nor Beam knows.

The check runs before anything is read or written, so every case here points at inputs
that do not exist: a command that got past its flags would fail differently.
"""
import pytest

from jest_curate import cli

# command -> its required flags (pointing nowhere).
STAGES = {
    "ingest": ["--input", "nowhere", "--format", "parquet", "--output", "out"],
    "embed": ["--corpus", "nowhere", "--model", "jest-vit-micro-28", "--output", "out"],
    "select": ["--corpus", "nowhere", "--output", "out", "--batch-size", "4",
               "--filter-ratio", "0.5", "--method", "uniform"],
    "layout": ["--corpus", "nowhere", "--output", "out", "--super-batch-size", "8"],
    "round": ["--layout", "nowhere", "--super-batches", "0:1", "--output", "out",
              "--batch-size", "4", "--method", "uniform"],
    "rounds": ["--config", "nowhere.json", "--output", "out"],
    "demo": ["--output", "out", "--config", "nowhere.json"],
    "train": ["--model", "jest-vit-micro-28", "--output", "out", "--shards", "nowhere"],
    "eval": ["--checkpoint", "nowhere.pt", "--eval-data", "nowhere"],
    "demo-data": ["--output", "out", "--data-dir", "nowhere"],
    "bench-select": [],
}
# The typo users made, per command, and the flag it should be suggested as.
TYPOS = {"ingest": ("--apend", "--append"), "embed": ("--patch-dropuot", "--patch-dropout"),
         "select": ("--temprature", "--temperature"),
         "layout": ("--shard-row", "--shard-rows"), "round": ("--learner-chekpoint",
                                                              "--learner-checkpoint"), "rounds": ("--refrence-embeddings",
                                                                 "--reference-embeddings"),
         "demo": ("--ful", "--full"), "train": ("--low-res-fracton", "--low-res-fraction"),
         "eval": ("--batch-sise", "--batch-size"), "demo-data": ("--pool-sise", "--pool-size"),
         "bench-select": ("--thread", "--threads")}


@pytest.mark.parametrize("command", sorted(STAGES))
def test_an_unknown_flag_stops_the_command_naming_the_closest_one(command, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    typo, closest = TYPOS[command]
    with pytest.raises(SystemExit) as stop:
        cli.main([command, *STAGES[command], typo, "0.1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown flag {typo}" in err
    if closest:
        assert f"did you mean {closest}?" in err
    assert not (tmp_path / "out").exists()  # Nothing ran.


@pytest.mark.parametrize("command", ["ingest", "embed", "select", "layout", "round", "rounds",
                                     "demo"])
def test_beam_and_dataflow_options_still_pass_through(command, tmp_path, monkeypatch, capsys):
    """Real Beam options get past the check; the command then fails on its missing input."""
    monkeypatch.chdir(tmp_path)
    # DirectRunner: DataflowRunner would look for credentials; its options parse all the same.
    beam = ["--runner", "DirectRunner", "--project", "p", "--region", "us-central1",
            "--temp_location", "tmp", "--staging_location", "staging",
            "--machine_type", "n1-standard-8", "--disk_size_gb", "100",
            "--dataflow_service_options",
            "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver",
            "--experiments", "no_use_multiple_sdk_containers",
            "--number_of_worker_harness_threads", "4", "--max_num_workers", "8",
            "--setup_file", "./setup.py", "--sdk_container_image", "img",
            "--sdk_location", "container", "--dry_run=True",
            "--environment_type=LOOPBACK", "--job_endpoint=embed",
            "--direct_running_mode=multi_processing", "--environment_config=localhost:5",
            "--save_main_session", "--direct_num_workers", "2"]
    assert cli.main([command, *STAGES[command], *beam]) == 2
    err = capsys.readouterr().err
    assert "unknown flag" not in err and f"jest-curate {command}: error:" in err


def test_a_stray_positional_argument_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["select", *STAGES["select"], "extra"])
    assert "unexpected argument 'extra'" in capsys.readouterr().err


def test_abbreviations_are_not_taken_for_our_flags(capsys):
    """`--temp` must not silently mean `--temperature` when flags pass through to Beam."""
    with pytest.raises(SystemExit):
        cli.main(["select", *STAGES["select"], "--temp", "0.1"])
    assert "unknown flag --temp" in capsys.readouterr().err


@pytest.mark.parametrize("argv,hint", [
    (["select", "--corpus", "c", "--output", "o", "--batch-size", "4", "--filter-ratio", "0.5",
      "--method", "easy-reference", "--reference-embeddings", "nowhere"],
     "`jest-curate embed --output nowhere` writes one"),
    (["embed", "--corpus", "nowhere", "--model", "jest-vit-micro-28", "--output", "o"],
     "a corpus comes from `jest-curate ingest`"),
    (["train", "--shards", "nowhere", "--model", "jest-vit-micro-28", "--output", "o"],
     "`jest-curate select` writes curated shards"),
    (["eval", "--checkpoint", "nowhere.pt", "--eval-data", "e"], "`jest-curate train` writes"),
    (["rounds", "--config", "nowhere.json", "--output", "o"], "no run config at nowhere.json"),
])
def test_a_missing_input_is_one_line_naming_the_step_that_makes_it(argv, hint, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"jest-curate {argv[0]}: error:") and hint in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o" / "checkpoints").exists()  # train checks data before step 0.
