"""`jest-curate readme`: the README's result blocks, rendered from committed summaries.

Every figure in the README sits between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->`
and is the output of one renderer on one committed summary.json (BLOCKS). This command
rewrites those blocks in place (`--check`: only report which are stale, exit 1), and
tests/test_readme_figures.py checks that each equals what it renders.
"""
import argparse
import json
import os
import re
import sys

from jest_curate import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rounds_scale(summary: dict) -> str:
    from benchmarks import rounds_scale  # Only this block needs the benchmark.
    return rounds_scale.render_summary(summary)


# marker -> (the committed report folder, its renderer).
BLOCKS = {
    "results": ("results/full", report.render_table),
    "findings": ("results/full", report.render_findings),
    "levers_full": ("results/full_levers", report.render_table),
    "lever_findings": ("results/full_levers", report.render_lever_findings),
    "noise80_full": ("results/full_noise80", report.render_table),
    "noise80_findings": ("results/full_noise80", report.render_findings),
    "demo": ("results/demo", report.render_table),
    "results_fp32": ("results/full_fp32", report.render_table),
    "results_v1": ("results/full_v1", report.render_table),
    "noise80": ("results/noise80", report.render_table),
    "levers": ("results/levers", report.render_table),
    "rounds_scale": ("results/rounds_scale", _rounds_scale),
}


def block_pattern(marker: str) -> "re.Pattern":
    return re.compile(rf"(<!-- {marker}:begin -->\n)(.*?)(<!-- {marker}:end -->)", re.S)


def render_block(marker: str, root: str = ROOT) -> str:
    folder, render = BLOCKS[marker]
    with open(os.path.join(root, folder, "summary.json")) as f:
        return render(json.load(f))


def update(readme: str, root: str = ROOT) -> tuple:
    """(the README with every block re-rendered, the markers whose text changed)."""
    changed = []
    for marker in BLOCKS:
        pattern = block_pattern(marker)
        match = pattern.search(readme)
        if match is None:
            raise ValueError(f"README lacks the {marker} block "
                             f"(<!-- {marker}:begin --> ... <!-- {marker}:end -->)")
        text = render_block(marker, root)
        if match.group(2) != text:
            changed.append(marker)
            readme = readme[:match.start(2)] + text + readme[match.end(2):]
    return readme, changed


def run(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jest-curate readme", description=__doc__.split("\n")[0])
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    args = p.parse_args(argv)
    with open(args.readme) as f:
        text, changed = update(f.read(), os.path.dirname(os.path.abspath(args.readme)))
    if args.check:
        print("stale: " + ", ".join(changed) if changed else "every block is current")
        return 1 if changed else 0
    if changed:
        tmp = args.readme + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.readme)
    print("rewrote: " + ", ".join(changed) if changed else "every block is current",
          file=sys.stderr)
    return 0
