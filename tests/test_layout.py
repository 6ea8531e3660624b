"""The README's Layout is kept true: every module is listed once, and each imports only modules listed above it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def listed_modules():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    return re.findall(r"^  (\w+)\.py ", block, flags=re.MULTILINE)


def test_every_module_is_listed_once_and_imports_only_modules_above_it():
    listed = listed_modules()
    package = ROOT / "sft_space"
    modules = sorted(p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert sorted(listed) == modules
    position = {name: i for i, name in enumerate(listed)}
    skins = {"cli"}
    for name in listed:
        if name in skins:
            continue
        source = (package / f"{name}.py").read_text(encoding="utf-8")
        imported = set(re.findall(r"from \.(\w+) import", source))
        imported |= {part.strip() for group in re.findall(r"from \. import ([\w, ]+)", source) for part in group.split(",")}
        later = sorted(other for other in imported if position.get(other, -1) > position[name])
        assert not later, f"{name}.py imports {later}, listed below it in the README's Layout"
