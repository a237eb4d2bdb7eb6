"""The package's dependency direction is one-way: config -> data -> math -> workers -> recipes -> cli.

Every module of ``rlhf_ray`` belongs to one layer. A module may import from its own layer
and from the layers before it, never from a later one; imports inside functions count too.
Reads the source with ``ast``; imports nothing of the package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_ray"

# layer -> the top-level modules and packages of rlhf_ray in it, in dependency order
LAYERS: dict[str, tuple[str, ...]] = {
    "config": ("errors", "files", "config_loader", "config"),
    "data": ("data", "assets", "envs"),
    "math": ("batch", "losses", "loss_terms", "advantages", "experience", "models"),
    "workers": ("workers", "runtime"),
    "recipes": ("driver", "recipes", "checkpoint", "metrics", "plots", "report"),
    "cli": ("cli", "submit", "jobs", "__main__"),
}
RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def top_level(module: str) -> str:
    """``rlhf_ray.workers.group`` -> ``workers``; ``rlhf_ray`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every rlhf_ray import in a file (``from rlhf_ray import
    x`` counts as ``rlhf_ray.x``; relative imports are resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("rlhf_ray")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "rlhf_ray":
                found += [(node.lineno, f"rlhf_ray.{a.name}") for a in node.names]
            elif base.startswith("rlhf_ray."):
                found.append((node.lineno, base))
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = top_level(module_name(path))
        if here not in RANK:
            continue  # the package's own __init__
        for line, target in imported_modules(path):
            there = top_level(target)
            if there in RANK and RANK[there] > RANK[here]:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {LAYER_OF[here]} layer "
                           f"imports {target} ({LAYER_OF[there]} layer)")
    return out


def test_every_module_has_a_layer():
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(names - set(RANK)) == [], "add new modules to LAYERS"
    assert sorted(set(RANK) - names - {"__main__"}) == [], "LAYERS names a module that is gone"


def test_imports_only_go_down_the_layers():
    assert violations() == []


@pytest.mark.parametrize("source, expected", [
    ("from rlhf_ray.workers.group import WorkerGroup\n", ["rlhf_ray.workers.group"]),
    ("from rlhf_ray import checkpoint, scaling\n", ["rlhf_ray.checkpoint", "rlhf_ray.scaling"]),
    ("def f():\n    import rlhf_ray.recipes.ppo\n", ["rlhf_ray.recipes.ppo"]),
    ("from ..workers import rollout\n", ["rlhf_ray.workers"]),
])
def test_the_check_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    """The checker itself: module-level, from-package, function-level and relative imports."""
    pkg = tmp_path / "rlhf_ray" / "data"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "rlhf_ray")
    assert [m for _, m in imported_modules(pkg / "mod.py")] == expected


def test_an_upward_import_is_reported(tmp_path, monkeypatch):
    pkg = tmp_path / "rlhf_ray"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "load.py").write_text("def f():\n    from rlhf_ray.workers.group import Worker\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert violations() == ["rlhf_ray/data/load.py:2: data layer imports rlhf_ray.workers.group "
                            "(workers layer)"]
