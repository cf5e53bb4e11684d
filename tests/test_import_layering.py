"""The package's import structure: no cycles, and each subsystem imports only the layers below.

Allowed imports between top-level parts of ``moe_parallel`` (``DESIGN.md`` section 2): ``ops``
and ``eager`` (``eager_only``) import nothing of ours; ``config`` only ``ops``; ``routing`` and
``experts`` only ``ops`` and ``config``, ``distributed`` those and ``eager``; ``dispatch`` those
plus ``routing``; ``layer`` composes them;
``checkpoint`` and ``integrations`` sit on top (``train`` uses both: checkpoints, converted HF
models), and nothing below imports them. ``plan`` (the layout planner) reads
``integrations.hf.families`` for ``--config``; nothing imports it. ``observe`` (router metrics
and their sinks) reads the layers; ``train`` uses it; ``report`` (the run's plots) reads
``observe``; ``replay`` (router replay over a model's layers) reads the layers; ``observe``
(routing traces) and ``train`` use it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "moe_parallel"
BELOW = {
    "ops": set(),
    "eager": set(),
    "config": {"ops"},
    "metrics": set(),
    "cpu_memory": set(),
    "routing": {"ops", "config"},
    "experts": {"ops", "config"},
    "distributed": {"ops", "config", "eager"},
    "dispatch": {"ops", "config", "distributed", "routing"},
    "reference": {"ops", "config"},
    "layer": {"ops", "eager", "config", "metrics", "routing", "experts", "distributed",
              "dispatch"},
    "checkpoint": {"ops", "config", "metrics", "routing", "experts", "distributed", "dispatch",
                   "layer"},
    "integrations": {"ops", "config", "metrics", "routing", "experts", "distributed",
                     "dispatch", "layer"},
    "replay": {"ops", "config", "metrics", "routing", "experts", "distributed", "dispatch",
               "layer"},
    "observe": {"ops", "config", "metrics", "routing", "experts", "distributed", "dispatch",
                "layer", "replay"},
    "plan": {"config", "integrations"},
    "report": {"observe"},
    "train": {"ops", "config", "metrics", "cpu_memory", "routing", "experts", "distributed",
              "dispatch", "layer", "checkpoint", "integrations", "observe", "replay"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = ("moe_parallel",) + path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports (anywhere in the file, lazy imports included);
    ``from pkg import sub`` counts as importing ``pkg.sub``, not ``pkg``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & mods.keys()
            rest = [a for a in node.names if f"{target}.{a.name}" not in mods]
            if rest and not all(a.name == "_C" for a in rest):
                subs.add(target)
            found |= subs
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return (found & mods.keys()) - {name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, cycles


def test_each_part_imports_only_the_layers_below():
    graph = _graph()
    assert set(BELOW) == {_part(m) for m in graph} - {""}, "a new part needs a BELOW entry"
    wrong = sorted(
        (m, t) for m, targets in graph.items() for t in targets
        if _part(m) and _part(t) != _part(m) and _part(t) not in BELOW[_part(m)]
    )
    assert not wrong, wrong
