"""The layering rule of docs/architecture.md, read from the imports of every module (statically, with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "sdt_dist"
# the method (SelfDistil-T's pieces) and the model know nothing of how they are run
METHOD = ["sdt_dist.distill"]
RUNNING = ["sdt_dist.parallel", "sdt_dist.trainer", "sdt_dist.train_step", "sdt_dist.train_module", "sdt_dist.cli",
           "sdt_dist.checkpoint", "sdt_dist.eval", "sdt_dist.data"]
RULES = {  # importer prefix -> prefixes it must not import
    "sdt_dist.model": RUNNING + METHOD,
    **{m: RUNNING for m in METHOD},
    "sdt_dist.config": [m for m in ("sdt_dist.model", "sdt_dist.parallel", "sdt_dist.data", "sdt_dist.eval",
                                    "sdt_dist.trainer", "sdt_dist.train_step", "sdt_dist.train_module",
                                    "sdt_dist.init_from", "sdt_dist.checkpoint", *METHOD)],
    "sdt_dist.data": ["sdt_dist.model", "sdt_dist.parallel", "sdt_dist.trainer", "sdt_dist.train_step",
                      "sdt_dist.train_module", "sdt_dist.eval", *METHOD],
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every sdt_dist module a file imports, at any depth of the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "sdt_dist":  # `from sdt_dist import losses` imports the module sdt_dist.losses
                found |= {f"sdt_dist.{a.name}" for a in node.names}
    return {m for m in found if m == "sdt_dist" or m.startswith("sdt_dist.")}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        importer = module_name(path, package.parent)
        for rule, forbidden in RULES.items():
            if not _matches(importer, rule):
                continue
            for imported in sorted(imports(path)):
                if any(_matches(imported, f) for f in forbidden) and not _matches(imported, rule):
                    out.append(f"{importer} imports {imported}")
    return out


def test_no_module_imports_against_the_layering_rule():
    assert violations() == []


def test_the_rule_catches_a_model_module_that_imports_parallel(tmp_path):
    fake = tmp_path / "sdt_dist" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from sdt_dist.parallel.dims import device\n    return device\n")
    (fake / "good.py").write_text("from sdt_dist.model.norm import LayerNorm\n")
    assert violations(tmp_path / "sdt_dist") == ["sdt_dist.model.bad imports sdt_dist.parallel.dims"]
