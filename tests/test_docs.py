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


def _first_bash_block(text: str) -> list[str]:
    block = re.search(r"```bash\n(.*?)\n```", text, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_ci_runs_exactly_the_readme_test_command():
    """README opens with the main job and the test command; .ci/run calls exactly that test command."""
    commands = _first_bash_block((ROOT / "README.md").read_text())
    assert commands == ["make lab", "make test"], commands
    script = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert script == ["make test"], script


def test_every_run_folder_name_is_in_the_readme():
    """The run folder layout the README describes names every file and folder opd writes there."""
    from opd.runtime.run_folder import RUN_FOLDER_NAMES

    readme = (ROOT / "README.md").read_text()
    # report.html is documented with `opd report` (its own section); the rest is the run folder paragraph's.
    missing = [name for name in sorted(RUN_FOLDER_NAMES - {"report.html"})
               if f"`{name}`" not in readme and f"`{name}/" not in readme]
    assert not missing, missing
    for inside in ("model/", "adapter/"):  # what a checkpoint folder holds (checkpoint.py), full or LoRA
        assert f"`{inside}`" in readme, inside


def test_example_configs_with_placeholder_paths_say_to_replace_them():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text()
        if re.search(r"\b(models|data)/", text):
            assert re.search(r"^# Replace the models/\.\.\. and data/\.\.\. paths", text, re.MULTILINE), path


def test_every_progress_bar_label_is_explained_in_the_readme():
    from opd.runtime.monitor import _PROGRESS_FIGURES

    readme = (ROOT / "README.md").read_text()
    for key, label in _PROGRESS_FIGURES:
        assert f"`{label}`" in readme, label
    for label in ("w", "cut", "r[DOMAIN] mean/p99/max"):  # the IS-weight and implicit-reward figures
        assert f"`{label}`" in readme, label


def test_the_quick_lab_time_is_stated_alike_everywhere():
    """`opd lab --quick`'s duration: one figure in its --help, the README, docs/lab.md and the Makefile."""
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "opd", "lab", "--help"], capture_output=True, text=True,
                               check=True).stdout
    sources = {"opd lab --help": " ".join(help_text.split()), "Makefile": (ROOT / "Makefile").read_text()}
    for name in ("README.md", "docs/lab.md"):
        sources[name] = (ROOT / name).read_text()
    claims = {}
    for name, text in sources.items():
        found = set(re.findall(r"(?:--quick|lab-quick|shrunk)[^\n]*?\babout (\w+ minutes?)", text))
        assert found, f"{name} states no duration for the quick lab"
        claims[name] = found
    assert len(set().union(*claims.values())) == 1, claims
