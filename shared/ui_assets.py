"""The dashboard's charting library, uPlot, fetched once by `switchyard ui install` (no Node, nothing built or
vendored in the repository).

Guarantees:
- The pinned release comes from the npm registry's tarball and is checked against the sha512 integrity the
  registry published for it before anything is written; a mismatch, a truncated download or a tarball without
  the expected files installs nothing and says why.
- Files land in a cache outside the repository (SWITCHYARD_UI_HOME, else ~/.cache/switchyard/uplot-<version>),
  written to a temporary folder and renamed into place, so a concurrent or interrupted install never leaves
  half a library for ingress to serve. A second run finds it and does nothing.
- Ingress serves only the names in FILES from there (`/ui/vendor/<name>`); when they are absent the page says
  "charts unavailable: run `switchyard ui install`" instead of breaking.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from switchyard.shared.settings import cache_home

UPLOT_VERSION = "1.6.32"
UPLOT_TARBALL = f"https://registry.npmjs.org/uplot/-/uplot-{UPLOT_VERSION}.tgz"
UPLOT_INTEGRITY = "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
"""The `dist.integrity` the npm registry publishes for the pinned release (Subresource Integrity format)."""
UI_HOME_ENV = "SWITCHYARD_UI_HOME"
FILES = {"uPlot.esm.js": "package/dist/uPlot.esm.js", "uPlot.min.css": "package/dist/uPlot.min.css",
         "LICENSE": "package/LICENSE"}
"""Served name -> path inside the tarball. Only these are extracted, and only these are served."""
MAX_TARBALL_BYTES = 4 << 20
INSTALL_COMMAND = "switchyard ui install"


def ui_home() -> Path:
    """Where the library lives: SWITCHYARD_UI_HOME, else ~/.cache/switchyard/uplot-<version> (outside the repo)."""
    return cache_home(UI_HOME_ENV, f"uplot-{UPLOT_VERSION}")


def installed(home: Path | None = None) -> bool:
    home = home or ui_home()
    return all((home / name).is_file() for name in FILES)


def asset(name: str) -> Path | None:
    """The installed file served as `name`, or None (not one of FILES, or not installed)."""
    if name not in FILES:
        return None
    path = ui_home() / name
    return path if path.is_file() else None


def check_integrity(data: bytes, integrity: str = UPLOT_INTEGRITY) -> None:
    """Raise RuntimeError unless `data` matches the SRI string (`sha512-<base64>`)."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise RuntimeError(f"unsupported integrity algorithm {algorithm!r}")
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != expected:
        raise RuntimeError(f"the uPlot tarball does not match its published integrity (got sha512-{got})")


def extract(data: bytes, home: Path) -> None:
    """Write FILES from the tarball `data` into `home`, atomically (a temporary sibling folder renamed in)."""
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}-", dir=home.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for name, member in FILES.items():
                try:
                    source = tar.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    raise RuntimeError(f"the uPlot tarball has no {member}")
                (staging / name).write_bytes(source.read())
        if home.exists():
            shutil.rmtree(home)
        staging.rename(home)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RuntimeError(f"could not unpack the uPlot tarball: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(url: str = UPLOT_TARBALL, integrity: str = UPLOT_INTEGRITY, home: Path | None = None) -> Path:
    """Fetch, verify and unpack the pinned uPlot into `home` (default `ui_home()`); a no-op when installed.

    Raises RuntimeError with the reason when the download fails or does not verify."""
    import httpx

    home = home or ui_home()
    if installed(home):
        return home
    try:
        with httpx.stream("GET", url, timeout=60, follow_redirects=True) as response:
            if response.status_code != 200:
                raise RuntimeError(f"fetching {url} answered HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_TARBALL_BYTES:
                    raise RuntimeError(f"the uPlot tarball is larger than {MAX_TARBALL_BYTES} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise RuntimeError(f"could not fetch {url}: {e}") from e
    data = b"".join(chunks)
    check_integrity(data, integrity)
    extract(data, home)
    return home
