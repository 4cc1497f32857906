"""`switchyard ui install` (shared/ui_assets.py) against a real HTTP server serving npm-style tarballs: a tarball
that matches its integrity is unpacked (only the served files), one that does not, or that lacks a file, installs
nothing and says why; a second run is a no-op; ingress serves only the known names."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from switchyard.shared import ui_assets


def tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


GOOD = tarball({"package/dist/uPlot.esm.js": b"export default function uPlot() {}\n",
                "package/dist/uPlot.min.css": b".uplot{}", "package/LICENSE": b"MIT",
                "package/dist/uPlot.cjs.js": b"not served"})


@pytest.fixture
def registry() -> Iterator[dict[str, Any]]:
    """A real HTTP server: path -> (status, body); counts the downloads."""
    served: dict[str, Any] = {"files": {}, "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            served["hits"] += 1
            status, body = served["files"].get(self.path, (404, b"no such tarball"))
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    served["url"] = f"http://127.0.0.1:{server.server_port}"
    yield served
    server.shutdown()
    server.server_close()


def test_a_verified_tarball_is_installed_once(registry: dict[str, Any], tmp_path: Path) -> None:
    registry["files"]["/uplot.tgz"] = (200, GOOD)
    home = tmp_path / "uplot"
    assert ui_assets.install(f"{registry['url']}/uplot.tgz", integrity(GOOD), home) == home
    assert sorted(p.name for p in home.iterdir()) == ["LICENSE", "uPlot.esm.js", "uPlot.min.css"]
    assert (home / "uPlot.esm.js").read_bytes().startswith(b"export default")
    ui_assets.install(f"{registry['url']}/uplot.tgz", integrity(GOOD), home)
    assert registry["hits"] == 1  # installed: the second run fetched nothing
    assert [p.name for p in tmp_path.iterdir()] == ["uplot"]  # no staging folder left behind


@pytest.mark.parametrize("case", ["tampered", "missing file", "not found", "not a tarball"])
def test_a_bad_download_installs_nothing(registry: dict[str, Any], tmp_path: Path, case: str) -> None:
    body = {"tampered": GOOD[:-1] + bytes([GOOD[-1] ^ 1]), "missing file": tarball({"package/LICENSE": b"MIT"}),
            "not found": b"", "not a tarball": b"<html>hello</html>"}[case]
    expected = integrity(GOOD) if case == "tampered" else integrity(body)
    registry["files"]["/uplot.tgz"] = (404 if case == "not found" else 200, body)
    home = tmp_path / "uplot"
    with pytest.raises(RuntimeError) as e:
        ui_assets.install(f"{registry['url']}/uplot.tgz", expected, home)
    reason = {"tampered": "integrity", "missing file": "has no package/dist/uPlot.esm.js", "not found": "HTTP 404",
              "not a tarball": "could not unpack"}[case]
    assert reason in str(e.value)
    assert not home.exists() and list(tmp_path.iterdir()) == []


def test_only_the_known_files_are_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ui_assets.UI_HOME_ENV, str(tmp_path))
    assert ui_assets.asset("uPlot.esm.js") is None  # not installed yet
    (tmp_path / "uPlot.esm.js").write_text("x")
    (tmp_path / "secret.txt").write_text("x")
    assert ui_assets.asset("uPlot.esm.js") == tmp_path / "uPlot.esm.js"
    for name in ("secret.txt", "../uPlot.esm.js", "/etc/passwd", ""):
        assert ui_assets.asset(name) is None

