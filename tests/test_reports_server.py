"""``sdetr report`` through a real ``mlflow server`` on loopback: the same tables as from the
SQLite file the server serves."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sdetr.cli import main
from test_reports import EXPERIMENT, store  # noqa: F401  (the fixture: a store of known runs)

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(store):  # noqa: F811
    """``mlflow server`` on 127.0.0.1 over the store's SQLite file; stopped afterwards."""
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    root = store["root"]
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", store["uri"], "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--default-artifact-root", (root / "served").as_uri()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + READY_TIMEOUT_S
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not answer on {url} "
                            f"(exit code {proc.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_report_from_the_server_equals_the_report_from_the_sqlite_file(store, server,  # noqa: F811
                                                                     tmp_path):
    outs = {}
    for kind, uri in (("sqlite", store["uri"]), ("server", server)):
        outs[kind] = tmp_path / kind
        assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri,
                     "--out", str(outs[kind])]) == 0
    for name in ("table1.md", "table1.tex", "table1.csv"):
        assert (outs["server"] / name).read_text() == (outs["sqlite"] / name).read_text(), name
    assert server in (outs["server"] / "index.md").read_text()
