"""/healthz (docs/protocol.md, `GET /healthz`): 200 while its parts work, 503 naming what failed.
The broadcast half is proven against a real Redis in test_multiprocess.py."""

from __future__ import annotations

import asyncio
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


def test_health_checks_that_overlap_each_get_their_own_answer_never_an_error(tmp_path):
    """A check that waits on one probe while a later check starts the next must
    still read its own probe (a 500 from /healthz was seen under a request flood)."""
    async def overlapping() -> list[bool]:
        storage = client.app.state.chat.storage
        first = asyncio.ensure_future(storage.healthy())
        await asyncio.sleep(0)  # the first check waits on its probe
        while not storage._probe.done():
            await asyncio.sleep(0)
        # the probe is done, the first check not yet resumed: a second check starts the next probe
        second = asyncio.ensure_future(storage.healthy())
        return list(await asyncio.gather(first, second))

    with TestClient(chatx.create_app(database_url=f"sqlite:///{tmp_path / 'chat.db'}")) as client:
        assert client.portal.call(overlapping) == [True, True]
