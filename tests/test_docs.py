"""The docs state the defaults the code has (issue 32 N10: docs/method.md gave beta = 3 as ours, the default
is 1.0)."""

import dataclasses
import re
from enum import Enum
from pathlib import Path

from optimum_fair import FairCalibConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
DEFAULTS = {f.name: f.default for f in dataclasses.fields(FairCalibConfig)  # None: resolved per model, skipped
            if f.default is not dataclasses.MISSING and f.default is not None}


def _rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table under the line `header` (its header and rule rows dropped)."""
    lines = text.split(header + "\n", 1)[1].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _shown(value) -> str:
    return str(value.value if isinstance(value, Enum) else value)


def test_config_field_table_gives_the_code_defaults():
    rows = _rows((DOCS / "method.md").read_text(), "| group | field | default | meaning (paper symbol) |")
    checked = 0
    for _, field, default, _meaning in (r[:4] for r in rows):
        name = field.strip("`")
        if name in DEFAULTS:
            assert default.strip("`\"") == _shown(DEFAULTS[name]), name
            checked += 1
    assert checked >= 15


def test_ours_column_gives_the_code_default_where_it_is_a_number():
    rows = _rows((DOCS / "method.md").read_text(), "| choice | ours | field |")
    numbers = {}
    for _, ours, field in rows:
        first = re.match(r"[-\d.]+", ours)
        if first and field.strip("`") in DEFAULTS:
            numbers[field.strip("`")] = float(first.group().rstrip("."))
    assert set(numbers) >= {"early_boost", "floor"}
    assert numbers == {name: float(DEFAULTS[name]) for name in numbers}


def test_readme_install_says_which_torch_build_each_platform_gets():
    """issue 32 N1: the install line said `pip install torch==2.13.0  # CPU build`; from PyPI on Linux x86-64
    that is the CUDA build (several GB)."""
    readme = (DOCS.parent / "README.md").read_text()
    install = readme.split("## Install\n", 1)[1].split("\n## ", 1)[0]
    assert "CPU build" not in install.split("```bash", 1)[1].split("```", 1)[0]  # no claim inside the command
    assert "Linux x86-64 gets the CUDA build" in install
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in install


def test_llama_cpp_build_time_is_one_measured_figure():
    """issue 32 N9: the build time was given three ways (6.3, 13 and 15 min; the script said 30)."""
    root = DOCS.parent
    texts = {name: (root / name).read_text() for name in ("docs/export.md", ".ci/run", "scripts/build_llama_cpp.py")}
    figures = {name: re.findall(r"(\d+(?:\.\d+)?) min(?:utes)?\s+(?:#\s*)?from scratch", text.replace("\n", " "))
               for name, text in texts.items()}
    assert figures == {name: ["17"] for name in texts}, figures
