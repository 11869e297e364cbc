"""Every solm name the README's code uses imports, and the README opens with the two commands CI runs."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_readme_python_names_import():
    code = "\n".join(_code_blocks("python"))
    names = set(re.findall(r"\bsolm_compile(?:\.\w+)*", README))            # dotted names anywhere in the README
    names |= {f"solm_compile.{a}" for a in re.findall(r"\bsolm\.(\w+)\(", code)}   # `import solm_compile as solm`
    assert {"solm_compile.compile", "solm_compile.load", "solm_compile.SolmConfig"} <= names
    for name in sorted(names):
        _resolve(name)            # raises (and fails the test) on a name that does not exist


def test_readme_opens_with_the_two_commands():
    first = _code_blocks("bash")[0].splitlines()
    commands = [line for line in first if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "solm-compile smollm2" in commands[0] and "solm run" in commands[0]
    assert commands[1].startswith("python3 -m venv") and commands[1].endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '^python3 -m venv .* pytest' README.md" in ci   # CI runs exactly this line


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to a missing {target}"
