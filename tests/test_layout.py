"""The package layout users and CI rely on: one installed name, and imports that only point down.

- The wheel installs `switchyard` alone (no top-level `shared` or `services` in a user's site-packages), with
  the services, the shared library and their data files under it, and the `switchyard` command pointing at
  `switchyard.cli`.
- `lint-imports` passes on the tree and fails on an upward or a cross-service import, so CI catches either.
- README's folder table names the folders there are.

The first two work on a copy of the package folders in a temporary directory: a build leaves `build/` behind,
whose stale files setuptools would put in the next wheel, and the deliberate bad imports must not touch the
checkout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_tree(dest: Path) -> Path:
    """pyproject.toml, README.md and the package folders (links kept as links) under `dest`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("switchyard", "shared", "services"):
        shutil.copytree(ROOT / name, dest / name, symlinks=True, ignore=ignore)
    return dest


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.exists(), "import-linter is a dev dependency: pip install -e '.[dev]'"
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=240,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_the_wheel_installs_one_package_named_switchyard(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    src = _copy_tree(tmp_path / "src")
    out = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(src)], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = out.glob("switchyard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"switchyard"}, sorted(tops)
    for wanted in ("switchyard/cli.py", "switchyard/batch.py", "switchyard/devstack/supervisor.py",
                   "switchyard/shared/contracts.py", "switchyard/shared/pricing.json",
                   "switchyard/shared/migrations/env.py", "switchyard/services/ingress/app.py",
                   "switchyard/services/workers/providers/__init__.py"):
        assert wanted in names, f"the wheel lacks {wanted}"
    versions = [n for n in names if n.startswith("switchyard/shared/migrations/versions/") and n.endswith(".py")]
    assert len(versions) == len(list((ROOT / "shared" / "migrations" / "versions").glob("*.py")))
    static = [n for n in names if n.startswith("switchyard/services/ingress/ui/static/")]
    assert len(static) == sum(1 for p in (ROOT / "services" / "ingress" / "ui" / "static").rglob("*") if p.is_file())
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "switchyard = switchyard.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_lint_imports_passes_and_fails_on_an_upward_or_cross_service_import(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    clean = _lint_imports(tree)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    with (tree / "shared" / "errors.py").open("a") as f:  # shared -> a tool: upward
        f.write("\nfrom switchyard.cli import main as _main  # noqa: E402\n")
    with (tree / "services" / "router" / "health.py").open("a") as f:  # a service -> another service
        f.write("\nimport switchyard.services.workers.pacing  # noqa: E402\n")
    with (tree / "services" / "accounting" / "ledger.py").open("a") as f:  # a bare-name import
        f.write("\nimport shared.topics  # noqa: E402\n")
    with (tree / "services" / "ingress" / "keys.py").open("a") as f:  # ingress -> SQLAlchemy (21 MB)
        f.write("\nimport switchyard.shared.db  # noqa: E402\n")
    broken = _lint_imports(tree)
    report = broken.stdout + broken.stderr
    assert broken.returncode != 0, report
    assert "switchyard.shared.errors -> switchyard.cli" in report, report
    assert "switchyard.services.router.health -> switchyard.services.workers.pacing" in report, report
    assert "switchyard.services.accounting.ledger -> shared" in report, report
    assert "switchyard.services.ingress.keys -> switchyard.shared.db" in report, report


@pytest.mark.parametrize("service", ["ingress", "router", "workers", "accounting"])
def test_no_service_imports_sqlalchemy(service: str) -> None:
    """What the import contract checks statically, at run time: the service and every module it loads."""
    probe = (f"import sys; import switchyard.services.{service}.main; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "[]", loaded.stdout[:500]


def test_the_readme_folder_table_matches_the_tree() -> None:
    """Every folder README's table names exists, and every top-level folder and service has its row."""
    table = set(re.findall(r"(?m)^\| `([\w./-]+/)` \|", (ROOT / "README.md").read_text()))
    assert table, "README.md has no folder table"
    for folder in table:
        assert (ROOT / folder).is_dir(), f"README's folder table names {folder}, which does not exist"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tops = {line.split("/", 1)[0] + "/" for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    services = {f"services/{p.name}/" for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists()}
    missing = (tops - {"services/"} | services) - table
    assert not missing, f"README's folder table lacks {sorted(missing)}"
