"""ChatX's Redis broadcast backend on its own, against a Redis server of the test's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from chatx import RedisPubSubBackend
from conftest import run_async


async def connected(url: str) -> RedisPubSubBackend:
    backend = RedisPubSubBackend(url)
    await backend.connect()
    deadline = time.monotonic() + 10
    while not backend.healthy:
        assert time.monotonic() < deadline, "the backend never became healthy"
        await asyncio.sleep(0.05)
    return backend


async def sent_by(backend: RedisPubSubBackend, channel: str, message: str) -> None:
    """publish_elsewhere() without waiting, then the publish barrier unsubscribe() waits for: batches go out in order."""
    backend.publish_elsewhere(channel, lambda: message)
    await backend._publish_queued()


async def published_while(url: str, act: Callable[[], Awaitable[None]]) -> list[bytes]:
    """What reached Redis on chan:* while `act` ran, seen by a pattern
    subscriber (which PUBSUB NUMSUB does not count as a subscriber)."""
    watcher = aioredis.Redis.from_url(url).pubsub()
    await watcher.psubscribe("chan:*")
    await watcher.get_message(timeout=2)  # the psubscribe confirmation
    await act()
    seen = []
    while (message := await watcher.get_message(ignore_subscribe_messages=True, timeout=0.5)) is not None:
        seen.append(message["data"])
    await watcher.aclose()
    return seen


def test_a_frame_this_process_delivered_is_published_only_when_another_process_subscribes(redis_server):
    async def scenario() -> None:
        here, there = await connected(redis_server.url), await connected(redis_server.url)
        try:
            await here.subscribe("chan:alice")
            alone = await published_while(redis_server.url, lambda: sent_by(here, "chan:alice", "m1"))
            assert alone == []

            await there.subscribe("chan:alice")
            shared = await published_while(redis_server.url, lambda: sent_by(here, "chan:alice", "m2"))
            assert shared == [f"{here.origin} m2".encode()]
            event = await asyncio.wait_for(there.next_published(), 5)
            assert (event.channel, event.message) == ("chan:alice", "m2")
            try:
                own = await asyncio.wait_for(here.next_published(), 0.5)
            except asyncio.TimeoutError:
                own = None
            assert own is None  # its own copy came back and was dropped

            await there.unsubscribe("chan:alice")
            await asyncio.sleep(0.2)

            async def two_batches() -> None:
                await sent_by(here, "chan:alice", "m3")
                await sent_by(here, "chan:alice", "m4")

            # The count remembered from m2's batch lets m3 out without waiting; m3's own count keeps m4 back.
            again = await published_while(redis_server.url, two_batches)
            assert again == [f"{here.origin} m3".encode()]
        finally:
            await here.disconnect()
            await there.disconnect()

    run_async(scenario)


def test_a_frame_for_a_channel_this_process_does_not_subscribe_reaches_the_one_that_does(redis_server):
    async def scenario() -> None:
        here, there = await connected(redis_server.url), await connected(redis_server.url)
        try:
            await there.subscribe("chan:bob")
            await sent_by(here, "chan:bob", "hi bob")
            event = await asyncio.wait_for(there.next_published(), 5)
            assert (event.channel, event.message) == ("chan:bob", "hi bob")
        finally:
            await here.disconnect()
            await there.disconnect()

    run_async(scenario)


def test_a_frame_is_encoded_only_for_channels_another_process_subscribes_to(redis_server):
    async def scenario() -> list[str]:
        here, there = await connected(redis_server.url), await connected(redis_server.url)
        encoded: list[str] = []

        def message(text: str) -> Callable[[], str]:
            def encode() -> str:
                encoded.append(text)
                return text
            return encode

        try:
            await here.subscribe("chan:alice")
            await here.subscribe("chan:bob")
            await there.subscribe("chan:bob")
            for channel, text in [("chan:alice", "alone"), ("chan:bob", "shared"), ("chan:carol", "no one")]:
                here.publish_elsewhere(channel, message(text))
            await here._publish_queued()  # the barrier: after the batch above
            event = await asyncio.wait_for(there.next_published(), 5)
            assert (event.channel, event.message) == ("chan:bob", "shared")
        finally:
            await here.disconnect()
            await there.disconnect()
        return encoded

    assert run_async(scenario) == ["shared"]


def test_a_process_that_subscribes_while_frames_flow_gets_every_frame_published_after_it_subscribed(redis_server):
    """What a publisher remembers of other processes' subscriptions may only
    let frames out, never keep one back from a process that just joined."""
    async def scenario() -> None:
        here, there = await connected(redis_server.url), await connected(redis_server.url)
        published: list[str] = []
        try:
            await here.subscribe("chan:alice")
            flowing = True

            async def flow() -> None:
                while flowing:
                    published.append(f"m{len(published)}")
                    await sent_by(here, "chan:alice", published[-1])

            sender = asyncio.create_task(flow())
            windows = []  # [first, end) of the frames published while `there` subscribed
            for _ in range(4):
                await asyncio.sleep(0.1)
                await there.subscribe("chan:alice")
                first = len(published)  # every frame from here on is queued after the subscription
                await asyncio.sleep(0.1)
                windows.append((first, len(published)))  # queued before the unsubscribe's barrier
                await there.unsubscribe("chan:alice")
            flowing = False
            await sender
            received = []
            try:
                while True:
                    received.append(int((await asyncio.wait_for(there.next_published(), 1)).message[1:]))
            except asyncio.TimeoutError:
                pass
            assert received == sorted(set(received)), "frames came twice or out of order"
            for first, end in windows:
                assert end - first > 10
                assert set(range(first, end)) <= set(received), f"a frame of {first}-{end} was missed"
        finally:
            await here.disconnect()
            await there.disconnect()

    run_async(scenario)


def test_a_frame_for_a_channel_another_process_was_counted_on_goes_out_with_the_count_in_one_write(redis_server):
    """One round trip per batch once another process is known to subscribe:
    the publish does not wait for PUBSUB NUMSUB's answer."""
    async def scenario() -> list[bytes]:
        here, there = await connected(redis_server.url), await connected(redis_server.url)
        writes: list[bytes] = []
        try:
            await there.subscribe("chan:bob")
            await sent_by(here, "chan:bob", "first")  # counted: `there` subscribes
            send = here._publishing.send_packed_command

            async def recorded(command: bytes, *args, **kwargs) -> None:
                writes.append(command)
                await send(command, *args, **kwargs)

            here._publishing.send_packed_command = recorded
            here.publish_elsewhere("chan:bob", lambda: "second")
            for text in ("first", "second"):
                event = await asyncio.wait_for(there.next_published(), 5)
                assert event.message == text
        finally:
            await here.disconnect()
            await there.disconnect()
        return writes

    writes = run_async(scenario)
    assert b"NUMSUB" in writes[0] and b"second" in writes[0]
