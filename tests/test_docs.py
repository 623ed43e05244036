"""What the README tells a newcomer in a clone holds for the files it describes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extras(text: str, pattern: str) -> set[str]:
    match = re.search(pattern, text)
    assert match, pattern
    return set(match.group(1).split(","))


def test_readme_install_extras_equal_setup_scripts():
    """The extras the README says `make env` installs are the ones scripts/setup.sh installs."""
    setup = extras((ROOT / "scripts" / "setup.sh").read_text(), r'pip_quiet -e "\.\[([a-z,-]+)\]"')
    readme = extras((ROOT / "README.md").read_text(), r'then `pip install -e "\.\[([a-z,-]+)\]"`')
    assert readme == setup


def test_example_configs_ask_for_no_odd_generation_length():
    """max_new_tokens: 8096 was a typo of 8192 in the example configs."""
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert "max_new_tokens: 8096" not in path.read_text(), path
