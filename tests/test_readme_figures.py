"""The README's headline figures are the committed demo summary, rendered, not retyped."""
import json
import os
import re

from jest_curate import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_results_equal_committed_summary():
    summary = json.load(open(os.path.join(ROOT, "results", "demo", "summary.json")))
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- results:begin -->\n(.*?)<!-- results:end -->", readme, re.S)
    assert block, "README lacks the results block"
    assert block.group(1) == report.render_table(summary)
    for key in ("examples_speedup", "flops_speedup", "final_zero_shot", "reference_zero_shot",
                "learner_beats_reference"):
        assert key in summary
