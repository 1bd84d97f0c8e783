"""The `jest-curate` command: one entry point, one subcommand per stage.

Subcommands are imported lazily so `jest-curate train` never imports Beam and
`--help` stays fast. Each target is a `run(argv)` function that parses its own flags.
Errors in what the user gave (a missing input, a bad config or file) print one line, not
a traceback; JEST_CURATE_DEBUG=1 shows the traceback.
"""
import importlib
import os
import sys

# FormatError, CheckpointError, DataError, ModelConfigError and config errors are
# ValueErrors; a missing input is a FileNotFoundError.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)

# name -> ("module:function", one-line help). Every target takes argv (a list).
COMMANDS = {
    "demo-data": ("jest_curate.demo_data:run", "build the Fashion-MNIST demo corpus"),
    "ingest": ("pipelines.ingest:main", "parquet/folder/WebDataset/img2dataset -> corpus shards"),
    "embed": ("pipelines.embed:main", "embed a corpus with a reference or learner model"),
    "select": ("pipelines.select:run", "JEST-select sub-batches per super-batch; write curated shards"),
    "layout": ("pipelines.layout:run", "lay out one pass of the pool as candidate shards"),
    "round": ("pipelines.round_job:run", "score, select and write one round from a pass layout"),
    "rounds": ("pipelines.rounds:run", "score -> select -> train, round after round (resumable)"),
    "demo": ("pipelines.demo:run", "the whole product on Fashion-MNIST, with a speedup report"),
    "bench-select": ("benchmarks.selection:main", "benchmark joint selection vs matmul FLOP/s"),
    "bench-scale": ("benchmarks.scale:main", "cost per example and select memory at 1x..8x"),
    "bench-rounds": ("benchmarks.rounds_scale:main", "a round's cost and launcher RSS at 1x..16x"),
    "readme": ("jest_curate.readme:run", "rewrite the README's result blocks from results/"),
    "train": ("training.main:train_main", "train a learner or reference model (SigLIP, resumable)"),
    "eval": ("training.main:eval_main", "zero-shot and retrieval metrics of a checkpoint"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: jest-curate COMMAND [options]   (jest-curate COMMAND --help)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"jest-curate: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        result = getattr(importlib.import_module(module_name), func_name)(rest)
    except USER_ERRORS as e:
        if os.environ.get("JEST_CURATE_DEBUG"):
            raise
        print(f"jest-curate {name}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
