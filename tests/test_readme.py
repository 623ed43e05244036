"""The README's `<!-- tested -->` python blocks, executed for real on tiny models (README "Python API")."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_TESTED_BLOCK = re.compile(r"<!-- tested -->\s*\n```python\n(.*?)\n```", re.DOTALL)


def python_blocks(text: str) -> list[str]:
    return _TESTED_BLOCK.findall(text)


def test_readme_has_tested_blocks_and_the_extractor_finds_them():
    sample = "x\n<!-- tested -->\n```python\nprint(1)\n```\n```python\nnot tested\n```\n"
    assert python_blocks(sample) == ["print(1)"]
    assert len(python_blocks(README.read_text())) >= 2


def test_readme_python_blocks_run(model_dir, prompts_file, tmp_path):
    namespace = {"student_dir": str(model_dir / "student"), "teacher_dir": str(model_dir / "teacher"),
                 "prompts_file": str(prompts_file), "output_dir": str(tmp_path / "run")}
    for number, block in enumerate(python_blocks(README.read_text()), start=1):
        exec(compile(block, f"README.md tested block {number}", "exec"), namespace)
    assert (Path(namespace["final_model"]) / "config.json").exists()


def test_import_opd_stays_light_until_an_api_name_is_used():
    import subprocess
    import sys

    code = ("import sys, opd; assert 'torch' not in sys.modules, 'import opd loaded torch'; "
            "opd.functional; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
