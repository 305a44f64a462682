"""Workloads of the benchmark, driving a server only through the ChatX contract.

Each workload opens its own sockets, is bounded in count and time, closes what
it opened and returns a dict of plain numbers (times in ms unless named _s).
The server process is measured from outside through a `Probe` (/proc).
"""

import asyncio
import contextlib
import gc
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from bench.client import Socket, User, login, register, statuses
from bench.progress import Progress

DRAIN_TIMEOUT_S = 10.0


class Probe(Protocol):
    def cpu_seconds(self) -> float: ...
    def rss_bytes(self) -> int: ...


@dataclass
class Target:
    """A server under test: where it listens, and how to measure its process."""

    url: str
    probe: Probe

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"


# ---------------------------------------------------------------- helpers

def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def latency_summary(seconds: Sequence[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"samples": len(ms), "p50_ms": percentile(ms, 0.50), "p95_ms": percentile(ms, 0.95),
            "p99_ms": percentile(ms, 0.99), "max_ms": max(ms, default=None)}


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Share of a core that the server and this load generator used since creation.

    A load generator near 100 % means the numbers may show its limit, not the
    server's. Spans under a second are not reported: /proc counts in 10 ms ticks.
    """

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.start = time.perf_counter()
        self.server_start = probe.cpu_seconds()
        self.own_start = own_cpu_seconds()

    def busy(self) -> dict:
        wall = time.perf_counter() - self.start
        if wall < 1.0:
            return {}
        return {"server_cpu_busy": (self.probe.cpu_seconds() - self.server_start) / wall,
                "loadgen_cpu_busy": (own_cpu_seconds() - self.own_start) / wall}


class LoopStalls:
    """How late the load generator's own event loop ran, and when.

    While it is stalled no frame is read and no send goes out, and every
    message due meanwhile counts the stall as the server's latency."""

    def __init__(self, tick: float = 0.001) -> None:
        self.tick = tick
        self.late: list[tuple[float, float]] = []  # (when, seconds late), for each tick over 1 ms late
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick)
            now = time.perf_counter()
            if now - before - self.tick > 0.001:
                self.late.append((now, now - before - self.tick))

    def stop(self, since: float, until: float) -> float:
        """Stop watching; return the longest stall that ended between `since` and `until`, in ms."""
        self._task.cancel()
        return max((late for when, late in self.late if since <= when <= until), default=0.0) * 1000


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection in the load generator while a workload runs.

    Measured in a full run: once the connections workload held 10,000
    sockets, each full collection walked them for 70-260 ms with the loop
    stopped, and the workloads after it still had 40-60 ms ones, counted as
    message latency. What one workload leaves is collected before the next."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:160]


async def bounded(jobs: Sequence[Callable[[], Awaitable]], limit: int,
                  progress: Progress | None = None) -> list:
    """Run jobs at most `limit` at a time; results (or exceptions) in job order."""
    gate = asyncio.Semaphore(limit)
    finished = 0

    async def one(job: Callable[[], Awaitable]):
        nonlocal finished
        async with gate:
            try:
                return await job()
            except Exception as exc:  # reported by the caller, per job
                return exc
            finally:
                finished += 1
                if progress:
                    progress.show(finished)

    results = await asyncio.gather(*(one(job) for job in jobs))
    if progress:
        progress.finish()
    return results


def count_failures(results: list) -> tuple[int, dict[str, int]]:
    failures = Counter(short_error(r) for r in results if isinstance(r, Exception))
    return sum(failures.values()), dict(failures.most_common(5))


async def open_sockets(target: Target, sockets: Sequence[Socket], limit: int,
                       progress: Progress | None = None) -> list:
    return await bounded([lambda s=s: s.open(target.ws_url) for s in sockets], limit, progress)


async def close_sockets(sockets: Sequence[Socket]) -> None:
    await bounded([s.close for s in sockets if s.connection is not None], 200)


async def register_users(http: httpx.AsyncClient, prefix: str, count: int) -> list[User]:
    """Register `count` users concurrently; ChatX hashes passwords in a thread pool."""
    names = [f"{prefix}{i:05d}" for i in range(count)]
    results = await bounded([lambda n=n: register(http, n) for n in names], 8,
                            Progress("registering users", count))
    failed, samples = count_failures(results)
    if failed:
        raise RuntimeError(f"{failed} of {count} registrations failed: {samples}")
    return results


async def wait_all_offline(http: httpx.AsyncClient, viewer: User, users: Sequence[User],
                           timeout: float = 20.0) -> int:
    """Wait until GET /api/users shows all `users` offline; return how many never were."""
    names = {u.username for u in users if u.username != viewer.username}
    deadline = time.monotonic() + timeout
    while True:
        online = {n for n, status in (await statuses(http, viewer)).items() if n in names and status != "offline"}
        if not online or time.monotonic() > deadline:
            return len(online)
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------- messages

class Traffic:
    """Messages from senders to their partners, and what the server answered.

    Latency runs from `sent_at` (the moment the send was due) to the first
    `message` frame on the partner's socket.
    """

    def __init__(self, body_size: int) -> None:
        self.body = "x" * body_size
        self.sent_at: dict[str, float] = {}  # client_id -> time
        self.acked: set[str] = set()
        self.delivered_at: dict[str, float] = {}  # client_id -> arrival at the partner
        self.echoed: set[str] = set()  # message frames back on the sender's socket
        self.duplicates = 0
        self.errors: Counter[str] = Counter()
        self.windows: dict[str, asyncio.Semaphore] = {}  # sender -> free window slots

    async def send(self, sender: Socket, to: str, client_id: str, due: float) -> None:
        self.sent_at[client_id] = due
        await sender.send({"type": "send", "to": to, "body": self.body, "client_id": client_id})

    def handle(self, socket: Socket, frame: dict, now: float) -> None:
        kind = frame.get("type")
        if kind == "message":
            self.on_message(socket, frame["message"], now)
        elif kind == "ack":
            self.acked.add(frame["client_id"])
            self.free_slot(socket)
        elif kind == "error":
            self.errors[frame.get("code", "?")] += 1
            if frame.get("client_id"):
                self.free_slot(socket)

    def on_message(self, socket: Socket, message: dict, now: float) -> None:
        client_id = message.get("client_id")
        if client_id not in self.sent_at:
            return  # not ours (another workload's or another client's)
        if message["to"].casefold() == socket.user.username.casefold():
            seen = client_id in self.delivered_at
            self.delivered_at.setdefault(client_id, now)
        else:
            seen = client_id in self.echoed
            self.echoed.add(client_id)
        self.duplicates += seen

    def free_slot(self, socket: Socket) -> None:
        window = self.windows.get(socket.user.username)
        if window is not None:
            window.release()

    def settled(self) -> bool:
        answered = len(self.acked) + sum(self.errors.values())
        return answered >= len(self.sent_at) and self.acked.issubset(self.delivered_at)

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        deadline = time.perf_counter() + timeout
        while not self.settled() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)

    def latencies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [self.delivered_at[c] - t for c, t in self.sent_at.items()
                if since <= t < until and c in self.delivered_at]

    def counts(self) -> dict:
        return {"sent": len(self.sent_at), "acked": len(self.acked),
                "delivered": len(self.delivered_at),
                "lost": len(self.acked - self.delivered_at.keys()),
                "not_echoed": len(self.acked - self.echoed),
                "unanswered": len(self.sent_at) - len(self.acked) - sum(self.errors.values()),
                "duplicates": self.duplicates, "errors": dict(self.errors)}


async def connect_pairs(target: Target, pairs: Sequence[tuple[User, User]],
                        traffic: Traffic) -> list[tuple[Socket, Socket]]:
    """One socket per person; each pair is (sender, receiver)."""
    sockets = [(Socket(a, traffic.handle), Socket(b, traffic.handle)) for a, b in pairs]
    flat = [s for pair in sockets for s in pair]
    failed, samples = count_failures(await open_sockets(target, flat, 50))
    if failed:
        await close_sockets(flat)
        raise RuntimeError(f"{failed} of {len(flat)} sockets did not open: {samples}")
    return sockets


async def send_windowed(sender: Socket, to: str, traffic: Traffic, window: int, end: float) -> None:
    """Closed loop: keep at most `window` sends unacknowledged until `end`."""
    slots = traffic.windows[sender.user.username] = asyncio.Semaphore(window)
    sequence = 0
    while True:
        await slots.acquire()  # released by acks, errors, and once at `end`
        now = time.perf_counter()
        if now >= end:
            return
        sequence += 1
        await traffic.send(sender, to, f"{sender.user.username}-{sequence}", now)


async def send_paced(pairs: Sequence[tuple[Socket, Socket]], traffic: Traffic, rate: float,
                     stop: asyncio.Event, limit_s: float, tag: str = "p") -> None:
    """Open loop: `rate` sends per second in total, round-robin over the senders,
    each timed from when it was due (so a slow server cannot hide its backlog)."""
    start = time.perf_counter()
    count = int(rate * limit_s)
    for k in range(count):
        if stop.is_set():
            return
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sender, receiver = pairs[k % len(pairs)]
        await traffic.send(sender, receiver.user.username, f"{sender.user.username}-{tag}{k}", due)


async def timed_progress(label: str, seconds: float) -> None:
    progress = Progress(label, seconds, " s")
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        progress.show(elapsed)
        await asyncio.sleep(0.2)
    progress.finish()


# ---------------------------------------------------------------- workloads

async def throughput(target: Target, pairs: Sequence[tuple[User, User]], window: int,
                     duration: float, body_size: int) -> dict:
    """Delivered messages per second with a window of unacknowledged sends per sender."""
    traffic = Traffic(body_size)
    sockets = await connect_pairs(target, pairs, traffic)
    warmup = min(1.0, duration / 5)
    meter = CpuMeter(target.probe)
    start = time.perf_counter()
    end = start + duration

    async def stop_at_end() -> None:
        await timed_progress("throughput", duration)
        for slots in traffic.windows.values():
            slots.release()

    await asyncio.gather(stop_at_end(), *(send_windowed(s, r.user.username, traffic, window, end)
                                          for s, r in sockets))
    await traffic.drain()
    server_cpu = target.probe.cpu_seconds() - meter.server_start
    busy = meter.busy()
    await close_sockets([s for pair in sockets for s in pair])
    counted = sum(1 for t in traffic.delivered_at.values() if start + warmup <= t <= end)
    delivered = len(traffic.delivered_at)
    return {"pairs": len(pairs), "window": window, "duration_s": duration,
            "msgs_per_s": counted / (duration - warmup),
            **traffic.counts(),
            "latency": latency_summary(traffic.latencies(since=start + warmup)),
            "server_cpu_s": server_cpu,
            "server_cpu_us_per_msg": server_cpu / delivered * 1e6 if delivered else None, **busy}


async def fixed_rate(target: Target, pairs: Sequence[tuple[User, User]], rate: float,
                     duration: float, body_size: int) -> dict:
    """Latency at a steady offered rate, below the maximum.

    As in `throughput`, the first second is a warm-up left out of the
    figures: it still carries the server's work for the sockets that have
    just connected (their presence frames to everyone)."""
    traffic = Traffic(body_size)
    sockets = await connect_pairs(target, pairs, traffic)
    warmup = min(1.0, duration / 5)
    stop = asyncio.Event()
    stalls = LoopStalls()
    start = time.perf_counter()
    await asyncio.gather(send_paced(sockets, traffic, rate, stop, duration),
                         timed_progress(f"fixed rate {rate:,.0f}/s", duration))
    await traffic.drain()
    stalled_ms = stalls.stop(since=start + warmup, until=time.perf_counter())
    await close_sockets([s for pair in sockets for s in pair])
    delivered = [t for t in traffic.delivered_at.values() if start + warmup <= t <= start + duration]
    return {"offered_per_s": rate, "duration_s": duration, "warmup_s": warmup,
            "delivered_per_s": len(delivered) / (duration - warmup),
            **traffic.counts(), "latency": latency_summary(traffic.latencies(since=start + warmup)),
            "latency_with_warmup": latency_summary(traffic.latencies()),
            "loadgen_stall_max_ms": stalled_ms}


async def sign_in_under_load(target: Target, http: httpx.AsyncClient,
                             pairs: Sequence[tuple[User, User]], people: Sequence[User],
                             rate: float, baseline_s: float, body_size: int) -> dict:
    """Message latency before and while `people` sign in at once (POST /api/login).

    Password hashing must stay off the event loop: if it does not, messages
    sent during the sign-ins wait for the hashes.
    """
    traffic = Traffic(body_size)
    sockets = await connect_pairs(target, pairs, traffic)
    stop = asyncio.Event()
    start = time.perf_counter()
    chatting = asyncio.create_task(send_paced(sockets, traffic, rate, stop, limit_s=300, tag="s"))
    await timed_progress("sign-in: chat only", baseline_s)
    login_start = time.perf_counter()
    results = await bounded([lambda u=u: login(http, u) for u in people], len(people),
                            Progress("sign-in: logging in", len(people)))
    login_end = time.perf_counter()
    await asyncio.sleep(0.5)
    stop.set()
    await chatting
    await traffic.drain()
    await close_sockets([s for pair in sockets for s in pair])
    failed, samples = count_failures(results)
    return {"people": len(people), "chat_rate_per_s": rate,
            "logins_failed": failed, "login_errors": samples,
            "logins_s": login_end - login_start,
            "before": latency_summary(traffic.latencies(since=start + 0.5, until=login_start)),
            "during": latency_summary(traffic.latencies(since=login_start, until=login_end)),
            **traffic.counts()}


async def idle_connections(target: Target, users: Sequence[User], count: int,
                           hold_s: float = 2.0) -> dict:
    """Open `count` signed-in sockets spread over `users` and keep them idle.

    Sockets go round-robin over the users, so the first len(users) are each
    user's first socket (which sends presence) while few sockets are open yet.
    """
    rss_before = target.probe.rss_bytes()
    sockets = [Socket(users[i % len(users)]) for i in range(count)]
    start = time.perf_counter()
    results = await open_sockets(target, sockets, 100, Progress("opening idle sockets", count))
    connect_s = time.perf_counter() - start
    await asyncio.sleep(hold_s)  # let presence frames settle before measuring memory
    rss_after = target.probe.rss_bytes()
    opened = [s for s in sockets if s.connection is not None and s.hello is not None]
    dropped = sum(1 for s in opened if s.closed)
    await close_sockets(sockets)
    failed, samples = count_failures(results)
    return {"sockets": count, "users": min(count, len(users)), "opened": len(opened),
            "failed": failed, "failures": samples, "dropped_while_idle": dropped,
            "connects_per_s": len(opened) / connect_s,
            "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
            "rss_per_socket_kb": (rss_after - rss_before) / max(len(opened), 1) / 1024}


class Storm:
    """What each storm participant knows of everyone else's status.

    For each viewer, `wrong` counts the others whose known status (from hello,
    then presence frames) differs from the expected one; a phase is over when
    every tracked viewer has wrong == 0.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.expected = dict.fromkeys(names, "online")
        self.known: dict[str, dict[str, str]] = {}  # viewer -> other -> status
        self.from_frames: dict[str, dict[str, str]] = {}  # viewer -> other -> last frame status
        self.wrong: dict[str, int] = {}
        self.tracked = set(names)
        self.complete = 0
        self.done = asyncio.Event()
        self.duplicates = 0
        self.repeats_hello = 0

    def on_hello(self, socket: Socket) -> None:
        me = socket.user.username
        listed = {p["username"]: p["status"] for p in socket.hello.get("presence", [])}
        self.known[me] = {n: listed.get(n, "offline") for n in self.names if n != me}
        self.from_frames[me] = {}
        self.set_wrong(me, self.count_wrong(me))

    def handle(self, socket: Socket, frame: dict, now: float) -> None:
        me, other = socket.user.username, frame.get("username")
        if frame.get("type") != "presence" or me not in self.tracked or other not in self.names or other == me:
            return
        status = frame["status"]
        previous_frame = self.from_frames[me].get(other)
        if previous_frame == status:
            self.duplicates += 1
        elif previous_frame is None and self.known[me][other] == status:
            self.repeats_hello += 1
        self.from_frames[me][other] = status
        expected = self.expected[other]
        change = (status != expected) - (self.known[me][other] != expected)
        self.known[me][other] = status
        if change:
            self.set_wrong(me, self.wrong[me] + change)

    def count_wrong(self, me: str) -> int:
        return sum(1 for n, s in self.known[me].items() if s != self.expected[n])

    def set_wrong(self, me: str, wrong: int) -> None:
        before = self.wrong.get(me)
        self.wrong[me] = wrong
        self.complete += (wrong == 0) - (before == 0)
        if self.complete == len(self.tracked):
            self.done.set()

    def leave(self, leavers: Sequence[str]) -> None:
        """Start the second phase: `leavers` are expected offline, and no longer watch."""
        for name in leavers:
            self.expected[name] = "offline"
            self.tracked.discard(name)
        self.done.clear()
        self.complete = 0
        self.wrong = {}
        for me in self.tracked & self.known.keys():
            self.set_wrong(me, self.count_wrong(me))

    def missing(self) -> int:
        """Viewer/other pairs still wrong, counting a viewer with no socket as all wrong."""
        blind = len(self.tracked - self.known.keys())
        return sum(self.wrong.get(me, 0) for me in self.tracked) + blind * (len(self.names) - 1)


async def presence_storm(target: Target, users: Sequence[User], timeout_s: float) -> dict:
    """All `users` connect at once; then half leave at once. Each phase ends when
    every remaining user knows every other's status."""
    storm = Storm([u.username for u in users])
    sockets = [Socket(u, storm.handle) for u in users]

    async def join(socket: Socket) -> None:
        await socket.open(target.ws_url, timeout=timeout_s)
        storm.on_hello(socket)  # no await since open(): no frame was handled yet

    start = time.perf_counter()
    results = await bounded([lambda s=s: join(s) for s in sockets], len(sockets),
                            Progress("storm: connecting", len(sockets)))
    join_s, join_missing = await wait_phase(storm, start, timeout_s)
    leavers = sockets[len(sockets) // 2:]
    storm.leave([s.user.username for s in leavers])
    start = time.perf_counter()
    await close_sockets(leavers)
    leave_s, leave_missing = await wait_phase(storm, start, timeout_s)
    await close_sockets(sockets)
    failed, samples = count_failures(results)
    return {"users": len(users), "connect_failed": failed, "connect_errors": samples,
            "join_s": join_s, "leave_s": leave_s,
            "total_s": join_s + leave_s if join_s is not None and leave_s is not None else None,
            "missing": join_missing + leave_missing, "duplicates": storm.duplicates,
            "repeats_of_hello": storm.repeats_hello}


async def wait_phase(storm: Storm, start: float, timeout_s: float) -> tuple[float | None, int]:
    """(seconds until the storm's phase completed or None, pairs still wrong)."""
    try:
        await asyncio.wait_for(storm.done.wait(), timeout_s)
    except TimeoutError:
        return None, storm.missing()
    return time.perf_counter() - start, 0
