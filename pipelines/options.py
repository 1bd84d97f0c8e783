"""Stage CLIs: our flags, then Beam's; a flag neither knows stops the command.

Beam's options are every `PipelineOptions` subclass's, DataflowRunner's and the portable
runner's included, parsed the way `PipelineOptions.get_all_options` parses them.
"""
import argparse
from typing import List, Optional, Sequence, Tuple

# Importing the runners registers their option classes (as launching them would).
import apache_beam.runners.dataflow.dataflow_runner  # noqa: F401
import apache_beam.runners.portability.portable_runner  # noqa: F401
from apache_beam.options.pipeline_options import PipelineOptions, TestOptions
from apache_beam.options.pipeline_options import _BeamArgumentParser

from jest_curate import flags

__all__ = ["parse_stage_args", "beam_passthrough", "is_dry_run"]


def _beam_parser() -> argparse.ArgumentParser:
    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def beam_passthrough(args: List[str]) -> Tuple[List[str], List[str]]:
    """(args Beam does not know, Beam's option strings)."""
    parser = _beam_parser()
    _, unknown = parser.parse_known_args(args)
    return unknown, flags.option_strings(parser)


def parse_stage_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
                     ) -> Tuple[argparse.Namespace, List[str]]:
    """(our flags, Beam's flags); exits 2 naming a flag neither parser knows."""
    return flags.parse_strict(parser, argv, beam_passthrough)


def is_dry_run(beam_args: Sequence[str]) -> bool:
    """`--dry_run=True`: the runner builds the job and runs nothing, so a stage that reads
    its own outputs after the job must not."""
    return bool(PipelineOptions(list(beam_args)).view_as(TestOptions).dry_run)
