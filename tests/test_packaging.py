"""Packaging: every import is a declared dependency, optional ones fail in one line naming their extra,
``python -m moleflow`` works, the package data exists, constraints.txt pins what pyproject names."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from moleflow.extras import EXTRAS, MissingExtraError, require_extra

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "moleflow"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


RUNTIME = _names(PROJECT["dependencies"])
EXTRA_NAMES = {extra: _names(specs) for extra, specs in PROJECT["optional-dependencies"].items()}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"moleflow", "__future__"}


ALIASES = {"pydantic-core": "pydantic"}  # pydantic pins its own core exactly


@functools.cache
def _providers() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())  # scans every installed distribution: once


def _distribution(module: str) -> str:
    dists = _providers().get(module)
    if not dists and any(module in names for extra, names in EXTRA_NAMES.items() if extra not in ("dev", "all")):
        return module  # an optional package this environment has not installed, declared under its own name
    assert dists, f"{module} is imported but no installed distribution provides it"
    name = dists[0].lower().replace("_", "-")
    return ALIASES.get(name, name)


def test_every_import_of_the_package_is_declared_and_optional_ones_only_where_allowed() -> None:
    optional_home = {  # modules of an extra may be imported only under these paths
        "analysis": "analysis/",
        "serve": "serve/",
        "onnx": "deploy/",
        "tensorboard": "training_log.py",
        "mlflow": "training_log.py",
    }
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for module in _imports(path):
            dist = _distribution(module)
            if dist in RUNTIME:
                continue
            extras = [e for e, names in EXTRA_NAMES.items() if dist in names and e not in ("dev", "all")]
            assert extras, f"{rel} imports {module} ({dist}), which pyproject.toml does not declare"
            assert any(rel.startswith(optional_home.get(e, "\0")) for e in extras), (
                f"{rel} imports {module} from the optional extra {extras}; guard it with moleflow.extras.require_extra"
            )


def test_extras_table_matches_pyproject() -> None:
    for extra, modules in EXTRAS.items():
        assert extra in EXTRA_NAMES
        for module in modules:
            if importlib.util.find_spec(module) is not None:
                assert _distribution(module) in EXTRA_NAMES[extra]
    assert set(EXTRA_NAMES) >= {"demo", "analysis", "serve", "onnx", "ray", "dev", "all"}
    assert {"statsmodels", "pandas"} <= EXTRA_NAMES["analysis"] and not {"statsmodels", "pandas"} & RUNTIME
    assert "elpv-dataset" in EXTRA_NAMES["demo"] and "elpv-dataset" not in RUNTIME
    assert {"ruff", "pytest", "hypothesis", "freia"} <= EXTRA_NAMES["dev"]


def test_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "statsmodels" else real(name, *a))
    with pytest.raises(
        MissingExtraError, match=r"^moleflow analyze needs .*statsmodels: pip install 'moleflow\[analysis\]'$"
    ):
        require_extra("analysis", "moleflow analyze")


def test_analyze_and_demo_without_their_extras_fail_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from moleflow.cli import main

    real = importlib.util.find_spec
    hidden = {"statsmodels", "elpv_dataset"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    assert main(["analyze", "growth", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'moleflow[analysis]'" in err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pip install 'moleflow[demo]'" in err
    assert not (tmp_path / "demo" / "checkpoints").exists()  # refused before any training


def test_python_dash_m_moleflow_runs_the_cli() -> None:
    env_path = str(ROOT / "src")
    done = subprocess.run(
        [sys.executable, "-m", "moleflow", "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0 and "usage: moleflow" in done.stdout


def test_package_data_exists_and_license_is_spdx() -> None:
    assert (SRC / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moleflow"]
    for pattern in data:
        assert list(SRC.glob(pattern)), f"package-data pattern {pattern!r} matches no file"
    assert PROJECT["license"] == "Apache-2.0"


def test_constraints_pin_only_declared_packages() -> None:
    lines = [x for x in (ROOT / "constraints.txt").read_text().splitlines() if x and not x.startswith("#")]
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    assert all("==" in line for line in lines)
    declared = RUNTIME.union(*EXTRA_NAMES.values()) - {"moleflow"}
    assert pinned <= declared and RUNTIME <= pinned
