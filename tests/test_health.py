"""/healthz (docs/protocol.md, `GET /healthz`): 200 while its parts work, 503 naming what failed.
The broadcast half is proven against a real Redis in test_multiprocess.py."""

from __future__ import annotations

import shutil

import chatx
from starlette.testclient import TestClient


def test_healthz_is_ok_while_the_database_and_broadcast_answer(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broadcast": "ok"}}


def test_healthz_answers_503_naming_the_database_when_it_is_gone(tmp_path):
    home = tmp_path / "data"
    home.mkdir()
    with TestClient(chatx.create_app(database_url=f"sqlite:///{home / 'chat.db'}")) as client:
        assert client.get("/healthz").status_code == 200
        shutil.rmtree(home)  # every read opens a connection: now none can
        response = client.get("/healthz")
        assert response.status_code == 503
        assert response.json() == {"status": "fail", "checks": {"database": "fail", "broadcast": "ok"}}
