"""Imports point one way: cli -> app, demos -> areas -> core (schedule, samplers, precision, parallel, utils, nets,
configs, io, report, optim). Every import in the package is read, those inside functions too."""

import ast
from pathlib import Path

import difflab

PACKAGE = Path(difflab.__file__).parent
AREAS = ("digits", "ddim", "clip", "personalize", "minisd")
CORE = ("schedule", "samplers", "precision", "parallel", "utils", "nets", "configs", "io", "report", "optim")


def imports() -> dict[str, set[str]]:
    """{top-level part importing: {top-level parts of difflab it imports}} per module, e.g. 'ddim/models.py'."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difflab."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("difflab.")}
        found[str(path.relative_to(PACKAGE))] = names
    return found


def part(module: str) -> str:
    return module.split("/")[0].removesuffix(".py")


def test_every_part_is_known():
    assert {part(m) for m in imports()} <= {*AREAS, *CORE, "cli", "app", "demos", "__init__"}


def test_imports_point_one_way():
    wrong = []
    for module, names in imports().items():
        me = part(module)
        if me != "cli" and "cli" in names:
            wrong.append(f"{module} imports the CLI")
        if me != "cli" and "app" in names and me != "app":
            wrong.append(f"{module} imports the app")
        if me not in ("cli", "demos") and "demos" in names:
            wrong.append(f"{module} imports a demo")
        if me in CORE and names & set(AREAS):
            wrong.append(f"{module} (core) imports an area: {sorted(names & set(AREAS))}")
        if me in ("ddim", "clip") and names & (set(AREAS) - {me}):
            wrong.append(f"{module} imports another area: {sorted(names & (set(AREAS) - {me}))}")
        if me == "minisd" and "personalize" in names:
            wrong.append(f"{module} imports personalize")
    assert not wrong, wrong
