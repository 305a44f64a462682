"""`pip install` of the clone gives a working ChatX outside it.

The test copies the work tree (so the build leaves no build/ or *.egg-info in
the clone, and uncommitted changes are what gets tested), installs the copy
into a fresh virtual environment, then runs `python -m uvicorn chatx:app` from
an empty directory and talks to it over HTTP and a WebSocket.

The virtual environment is made without --system-site-packages and pip
resolves pyproject.toml's declared ranges from the package index, so a
dependency missing from pyproject.toml, or templates and static files left out
of the wheel, fail here even though requirements.txt and the clone have them.
pip's own download cache keeps a second run to about 20 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import venv
from pathlib import Path

import httpx2 as httpx
import pytest
from websockets.sync.client import connect

from conftest import PASSWORD, ROOT, free_port, wait_until

# What a build must not see: local environments, build output, databases and results.
NOT_SHIPPED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    "*.db", "*.db-wal", "*.db-shm", ".env", "results",
)


def run(command: list[str], timeout: float, **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A fresh virtual environment with the clone pip-installed into it; its python."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SHIPPED)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        timeout=180, env=clean_env())
    return python


def clean_env() -> dict[str, str]:
    """The environment without anything that could make the clone importable or
    change ChatX's settings."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("CHATX_", "PYTHON", "VIRTUAL_ENV"))}


@pytest.mark.timeout(300)
def test_pip_install_of_the_clone_serves_chatx_from_any_directory(installed: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**clean_env(), "CHATX_DATABASE_URL": f"sqlite:///{workdir / 'chat.db'}"}

    where = run([str(installed), "-c", "import chatx; print(chatx.__file__)"], timeout=30, cwd=workdir, env=env)
    assert Path(where.strip()).is_relative_to(installed.parent.parent), f"chatx imported from {where.strip()}"

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / "uvicorn.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(installed), "-m", "uvicorn", "chatx:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        def healthy() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"the installed server exited:\n{log_path.read_text()[-4000:]}")
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=30, what=f"the installed ChatX to answer (log: {log_path})")

        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/").status_code == 303  # signed out: to the sign-in page

            login = client.get("/login")
            assert login.status_code == 200
            assert "Sign in" in login.text and "Username" in login.text

            # Every static file the page names is served, byte for byte the clone's.
            assets = re.findall(r'(?:src|href)="(?:https?://[^/"]+)?(/static/[^"]+)"', login.text)
            assert any(path.endswith(".js") for path in assets), assets
            for path in assets:
                response = client.get(path)
                assert response.status_code == 200, path
                assert response.content == (ROOT / path.lstrip("/")).read_bytes(), path
            assert "javascript" in client.get("/static/chat.js").headers["content-type"]

            registered = client.post("/api/register", json={"username": "alice", "password": PASSWORD})
            assert registered.status_code == 201, registered.text
            assert registered.json()["user"]["username"] == "alice"
            assert client.get("/api/me").json()["user"]["username"] == "alice"

            chat_page = client.get("/")
            assert chat_page.status_code == 200 and 'aria-label="Messages"' in chat_page.text

            cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
            with connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"cookie": cookie}) as ws:
                hello = json.loads(ws.recv(timeout=10))
                assert hello["type"] == "hello" and hello["user"]["username"] == "alice", hello

        assert (workdir / "chat.db").exists() and not (workdir / "chatx.db").exists()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]
