"""Command-line flags: a flag no parser knows stops the command, naming the closest one.

Stage CLIs hand the flags they do not define to Beam, and Beam only logs "Discarding
unparseable args", so a typo such as `--temprature 0.1` would run at the default. Here
the leftover flags are offered to a pass-through (Beam's options, see
`pipelines.options`); whatever it does not know either is an error before anything runs.
No Beam import here: `jest-curate train` never imports Beam.
"""
import argparse
import difflib
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["parse_strict", "option_strings"]

# leftover args -> (args the pass-through does not know, the option strings it knows)
PassThrough = Callable[[List[str]], Tuple[List[str], List[str]]]


def option_strings(parser: argparse.ArgumentParser) -> List[str]:
    return [opt for action in parser._actions for opt in action.option_strings]


def _unknown_message(unknown: Sequence[str], known: Sequence[str]) -> str:
    parts, i = [], 0
    while i < len(unknown):
        arg = unknown[i]
        i += 1
        if not arg.startswith("-"):
            parts.append(f"unexpected argument {arg!r}")
            continue
        name = arg.split("=", 1)[0]
        if "=" not in arg and i < len(unknown) and not unknown[i].startswith("-"):
            i += 1  # Its value.
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"unknown flag {name}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(parts)


def parse_strict(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                 passthrough: Optional[PassThrough] = None
                 ) -> Tuple[argparse.Namespace, List[str]]:
    """(parsed flags, the flags left for the pass-through); exits 2 on an unknown flag.

    Abbreviations are off: with flags passed through, `--temp` must not silently mean
    `--temperature`.
    """
    parser.allow_abbrev = False
    args, rest = parser.parse_known_args(None if argv is None else list(argv))
    unknown, known = (rest, []) if passthrough is None else passthrough(rest)
    if unknown:
        parser.error(_unknown_message(unknown, option_strings(parser) + list(known)))
    return args, rest
