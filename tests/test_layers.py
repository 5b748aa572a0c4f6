"""No import runs back up a layer (docs/architecture.md): read off the source with ``ast``, imports inside functions
included, so a lazy import cannot hide a wrong direction.

    envs/                  text environments: no torch, no Lightning, nothing of ours above them
    modules/losses/        the pure-torch losses: torch and each other only; no Lightning, no other module, no data,
                           no env, no etpo
    modules/shared_base/   the one frozen LLM: knows no algorithm (losses included), no Lightning, no environment
    datamodules/           where environment and model meet: no algorithm module, nothing of etpo
    modules/               the algorithms: no environment, nothing of etpo
    etpo/                  the application floor: entry points (fit, benchmark, report, ...) and their helpers
                           (hardware, malloc); may import everything below, and nothing below imports it
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

OURS = ("envs", "etpo", "modules", "datamodules")
LOSSES = "modules.losses"
REPORT = ("etpo.report", "etpo.report.runs", "etpo.report.tables", "etpo.report.plots", "etpo.report.compare",
          "etpo.report.settings", "etpo.report.classes", "etpo.report.__main__")
ENTRY_POINTS = ("etpo.fit", "etpo.benchmark", *REPORT, "etpo.console", "etpo.credit", "etpo.perplexity")
ETPO_HELPERS = ("etpo.hardware", "etpo.malloc", "etpo.run_settings", "etpo.run_files")  # below the entry points


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement of the file, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)  # from . import x: x may be a module
            else:
                found.add(node.module)
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in OURS for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# (which files, which imports they must not make, which of those they may make after all, why)
RULES = [
    (("envs",), ("torch", "lightning", "transformers", "peft", "modules", "datamodules", "etpo"), (),
     "envs/ imports no torch and nothing of ours above it"),
    ((LOSSES,), ("lightning", "modules", "datamodules", "envs", "etpo"), (LOSSES,),
     "the losses are pure torch: they import torch and each other, nothing else of ours"),
    (("modules.shared_base",), ("lightning", "envs", "datamodules", "modules.etpo", "modules.ppo_kl",
                                "modules.grpo", "modules.reflection", "modules.agent", LOSSES, "etpo"), (),
     "the shared base knows no algorithm and no trainer"),
    (("datamodules",), ("modules", "etpo"), (), "the rollout takes any policy through its protocol"),
    (("modules",), ("envs", "etpo"), (), "an algorithm module needs no environment and nothing of the application"),
    (ETPO_HELPERS, ENTRY_POINTS, (), "the entry points' helpers import no entry point"),
]


def _offences(where, forbidden, allowed=()) -> list[str]:
    offences = []
    for path in _sources():
        name = _module_name(path)
        if not _under(name, where):
            continue
        offences += [f"{path.relative_to(REPO)} imports {imp}" for imp in sorted(_imports(path))
                     if _under(imp, forbidden) and not _under(imp, allowed)]
    return offences


@pytest.mark.parametrize("where, forbidden, allowed, why", RULES, ids=[r[0][0] for r in RULES])
def test_no_import_runs_back_up_a_layer(where, forbidden, allowed, why):
    offences = _offences(where, forbidden, allowed)
    assert not offences, f"{why}:\n" + "\n".join(offences)


def test_the_rules_see_real_imports():
    """The reader is not blind: it finds the imports that the layers are made of."""
    assert "modules.losses.etpo" in _imports(REPO / "modules" / "etpo.py")
    assert "envs.base" in _imports(REPO / "datamodules" / "rollout.py")
    assert "torch" in _imports(REPO / "modules" / "losses" / "etpo.py")
    # the losses import each other (allowed), and the reader sees it
    assert {"modules.losses.etpo", "modules.losses.ppo"} <= _imports(REPO / "modules" / "losses" / "grpo.py")
    assert any(_under(i, ("modules",)) for i in _imports(REPO / "etpo" / "fit.py"))
    # the report package's files are read as etpo.report.*, and ENTRY_POINTS names each of them
    assert {_module_name(p) for p in (REPO / "etpo" / "report").glob("*.py")} == set(REPORT)
    assert "etpo.report.runs" in _imports(REPO / "etpo" / "report" / "plots.py")
    # a relative import resolves to the package it names
    assert any(i.startswith("envs.isolation") for i in _imports(REPO / "envs" / "datascience" / "evaluation.py"))
