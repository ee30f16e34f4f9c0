"""The README's promises: a short first code block, and the test command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_first_code_block_is_short_and_ends_in_a_result():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) < 10
    assert "#" in block[-1], "the last line shows its result in a comment"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.startswith("bash scripts/")]
    assert commands == ["bash scripts/setup_and_test.sh"]
    assert commands[0] in readme
