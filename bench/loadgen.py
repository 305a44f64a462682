"""Workloads of the benchmark, driving a server only through the ChatX contract (v2).

Each workload opens its own sockets, is bounded in count and time, closes what
it opened and returns a dict of plain numbers (times in ms unless named _s).
The server process is measured from outside through a `Probe` (/proc).
"""

import asyncio
import contextlib
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from bench.client import Socket, User, get_json, login, register, statuses
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


def stream_order(sockets: Sequence[Socket]) -> dict:
    """Stream frames out of seq order (gap, repeat, disorder) or without a seq, over `sockets`."""
    return {"seq_errors": sum(s.seq_errors for s in sockets),
            "seq_absent": sum(s.seq_absent for s in sockets)}


def count_failures(results: list) -> tuple[int, dict[str, int]]:
    failures = Counter(short_error(r) for r in results if isinstance(r, Exception))
    return sum(failures.values()), dict(failures.most_common(5))


async def open_sockets(target: Target, sockets: Sequence[Socket], limit: int,
                       progress: Progress | None = None) -> list:
    return await bounded([lambda s=s: s.open(target.ws_url) for s in sockets], limit, progress)


async def close_sockets(sockets: Sequence[Socket]) -> None:
    await bounded([s.close for s in sockets if s.connection is not None], 200)


async def register_users(http: httpx.AsyncClient, prefix: str, count: int) -> list[User]:
    """Register `count` users, two at a time: ChatX hashes passwords in a thread
    pool, on the one core it has here, and answers 503 busy beyond two hashes
    in flight from one address (v2), each costing a second's wait (Retry-After)."""
    names = [f"{prefix}{i:05d}" for i in range(count)]
    results = await bounded([lambda n=n: register(http, n) for n in names], 2,
                            Progress("registering users", count))
    failed, samples = count_failures(results)
    if failed:
        raise RuntimeError(f"{failed} of {count} registrations failed: {samples}")
    return results


async def wait_all_offline(http: httpx.AsyncClient, viewer: User, users: Sequence[User], prefix: str,
                           timeout: float = 20.0) -> int:
    """Wait until the directory (GET /api/users?q=`prefix`, page after page) shows
    none of `users` online; return how many still were. It shows a status to
    conversation partners only (null to others), so only `viewer`'s partners count."""
    names = {u.username for u in users if u.username != viewer.username}
    deadline = time.monotonic() + timeout
    while True:
        online = {n for n, status in (await statuses(http, viewer, prefix)).items()
                  if n in names and status == "online"}
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
        self.acked_at: dict[str, float] = {}  # client_id -> arrival of its ack at the sender
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
            self.acked_at.setdefault(frame["client_id"], now)
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

    def split_latencies(self, since: float = 0.0, until: float = float("inf")) -> tuple[list[float], list[float]]:
        """The same sends' latency in two parts: due to ack (the sender's commit)
        and ack to delivery (the fan-out; across processes, the broker's hop)."""
        to_ack, after_ack = [], []
        for c, t in self.sent_at.items():
            if since <= t < until and c in self.delivered_at and c in self.acked_at:
                to_ack.append(self.acked_at[c] - t)
                after_ack.append(self.delivered_at[c] - self.acked_at[c])
        return to_ack, after_ack

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
    flat = [s for pair in sockets for s in pair]
    await close_sockets(flat)
    counted = sum(1 for t in traffic.delivered_at.values() if start + warmup <= t <= end)
    delivered = len(traffic.delivered_at)
    return {"pairs": len(pairs), "window": window, "duration_s": duration,
            "msgs_per_s": counted / (duration - warmup),
            **traffic.counts(), **stream_order(flat),
            "latency": latency_summary(traffic.latencies(since=start + warmup)),
            "server_cpu_s": server_cpu,
            "server_cpu_us_per_msg": server_cpu / delivered * 1e6 if delivered else None, **busy}


async def fixed_rate(target: Target, pairs: Sequence[tuple[User, User]], rate: float,
                     duration: float, body_size: int) -> dict:
    """Latency at a steady offered rate, below the maximum.

    As in `throughput`, the first second is a warm-up left out of the
    figures: it still carries the server's work for the sockets that have
    just connected (their presence frames to their partners: after the
    presence storm, the pairs' people are all partners of one another)."""
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
    flat = [s for pair in sockets for s in pair]
    await close_sockets(flat)
    delivered = [t for t in traffic.delivered_at.values() if start + warmup <= t <= start + duration]
    return {"offered_per_s": rate, "duration_s": duration, "warmup_s": warmup,
            "delivered_per_s": len(delivered) / (duration - warmup),
            **traffic.counts(), **stream_order(flat),
            "latency": latency_summary(traffic.latencies(since=start + warmup)),
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
    busy_before = getattr(http, "busy_retries", 0)
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
            "busy_retries": getattr(http, "busy_retries", 0) - busy_before,
            "before": latency_summary(traffic.latencies(since=start + 0.5, until=login_start)),
            "during": latency_summary(traffic.latencies(since=login_start, until=login_end)),
            **traffic.counts()}


async def uploads_under_load(target: Target, pairs: Sequence[tuple[User, User]], uploaders: Sequence[User],
                             image: bytes, rate: float, baseline_s: float, upload_s: float, body_size: int,
                             rounds: int = 3) -> dict:
    """Message latency without and while `uploaders` each upload `image` again
    and again (POST /api/attachments, v3), with the server's memory meanwhile.

    An upload is streamed to storage a piece at a time and an image decoded off
    the event loop: if either were not, messages would wait behind the uploads
    and the server would hold whole files in memory.

    A p99 of one short stretch of chat moves a lot on a shared machine, so the
    chat goes on through `rounds` rounds of `baseline_s` without uploads and
    then `upload_s` with them; each round gives a ratio of the two p99s, and
    the median ratio (with the range) is the figure. The uploads come from a
    process of their own (bench/uploader.py), so that this one's event loop
    does only the chat; its longest stall is reported beside the figure.
    """
    traffic = Traffic(body_size)
    sockets = await connect_pairs(target, pairs, traffic)
    stop = asyncio.Event()
    chatting = asyncio.create_task(send_paced(sockets, traffic, rate, stop, limit_s=300, tag="u"))
    rss_before = rss_peak = target.probe.rss_bytes()
    statuses: Counter[int] = Counter()
    spans: list[tuple[float, float, float]] = []  # (chat only from, uploads from, uploads until)

    async def uploading(image_file: str, seconds: float) -> None:
        """The uploads of one round, from a process of their own (bench/uploader.py)."""
        plan = {"url": target.url, "cookies": [user.cookie for user in uploaders], "image": image_file,
                "seconds": seconds}
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.uploader", json.dumps(plan),
                                                       stdout=asyncio.subprocess.PIPE)
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the uploader exited with {process.returncode}")
        statuses.update({int(code): count for code, count in json.loads(out).items()})

    async def watch_memory(progress: Progress, begun: float, end: float) -> None:
        nonlocal rss_peak
        while (now := time.perf_counter()) < end:
            rss_peak = max(rss_peak, target.probe.rss_bytes())
            progress.show(now - begun)
            await asyncio.sleep(0.2)
        progress.finish()

    stalls = LoopStalls()
    with tempfile.NamedTemporaryFile(suffix=".png") as image_file:
        image_file.write(image)
        image_file.flush()
        for n in range(1, rounds + 1):
            quiet = time.perf_counter() + 0.5  # what the round before left in flight settles
            await timed_progress(f"uploads {n}/{rounds}: chat only", baseline_s + 0.5)
            begun = time.perf_counter()
            end = begun + upload_s
            progress = Progress(f"uploads {n}/{rounds}: uploading while chatting", upload_s, " s")
            await asyncio.gather(watch_memory(progress, begun, end), uploading(image_file.name, upload_s))
            spans.append((quiet, begun, time.perf_counter()))
    stalled_ms = stalls.stop(since=spans[0][0], until=time.perf_counter())
    await asyncio.sleep(0.5)
    stop.set()
    await chatting
    await traffic.drain()
    await close_sockets([s for pair in sockets for s in pair])
    measured = [{"before": latency_summary(traffic.latencies(since=quiet, until=begun)),
                 "during": latency_summary(traffic.latencies(since=begun, until=ended))}
                for quiet, begun, ended in spans]
    ratios = [r["during"]["p99_ms"] / r["before"]["p99_ms"] if r["before"]["p99_ms"] and r["during"]["p99_ms"]
              else None for r in measured]
    known = sorted(ratio for ratio in ratios if ratio is not None)
    middle = ratios.index(known[len(known) // 2]) if known else 0  # the round whose ratio is the median
    uploading_s = sum(ended - begun for _, begun, ended in spans)
    return {"uploaders": len(uploaders), "image_bytes": len(image), "chat_rate_per_s": rate, "rounds": len(spans),
            "uploads": statuses[201], "failed_count": sum(statuses.values()) - statuses[201],
            "upload_failures": {str(k): v for k, v in statuses.items() if k != 201},
            "upload_mb_per_s": statuses[201] * len(image) / 2**20 / uploading_s,
            "rss_before_mb": rss_before / 2**20, "rss_peak_mb": rss_peak / 2**20,
            "rss_growth_mb": (rss_peak - rss_before) / 2**20,
            "before": measured[middle]["before"], "during": measured[middle]["during"],
            "p99_ratio": known[len(known) // 2] if known else None,
            "p99_ratio_min": known[0] if known else None, "p99_ratio_max": known[-1] if known else None,
            "round_results": [{**r, "p99_ratio": ratio} for r, ratio in zip(measured, ratios)],
            "loadgen_stall_max_ms": stalled_ms,
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


# ---------------------------------------------------------------- presence

Partners = dict[str, set[str]]  # username -> their conversation partners


def everyone_partners(names: Sequence[str]) -> tuple[Partners, list[tuple[str, str]]]:
    """Each one a partner of every other: (partners, edges)."""
    edges = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    return partners_of(names, edges), edges


def ring_partners(names: Sequence[str], degree: int) -> tuple[Partners, list[tuple[str, str]]]:
    """Each one a partner of the degree/2 people on either side of them in a ring
    (everyone a partner of everyone when there are too few): (partners, edges)."""
    n = len(names)
    edges = {tuple(sorted((names[i], names[(i + k) % n])))
             for i in range(n) for k in range(1, degree // 2 + 1) if (i + k) % n != i}
    return partners_of(names, sorted(edges)), sorted(edges)


def partners_of(names: Sequence[str], edges: Sequence[tuple[str, str]]) -> Partners:
    partners: Partners = {n: set() for n in names}
    for a, b in edges:
        partners[a].add(b)
        partners[b].add(a)
    return partners


async def make_partners(target: Target, users: Sequence[User], edges: Sequence[tuple[str, str]],
                        each_way: bool, window: int = 32) -> dict:
    """Make conversation partners (v2: presence only goes to them) by a message
    along each edge, or one each way: every sender connects, sends with at most
    `window` unanswered, waits for every answer, and leaves."""
    outgoing: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        outgoing[a].append(b)
        if each_way:
            outgoing[b].append(a)
    errors: Counter[str] = Counter()
    slots: dict[str, asyncio.Semaphore] = {}

    def handle(socket: Socket, frame: dict, now: float) -> None:
        kind = frame.get("type")
        if kind == "error" and frame.get("client_id"):
            errors[frame.get("code", "?")] += 1
        if kind == "ack" or (kind == "error" and frame.get("client_id")):
            slots[socket.user.username].release()

    by_name = {u.username: u for u in users}
    sockets = [Socket(by_name[name], handle) for name in outgoing]
    total = sum(len(peers) for peers in outgoing.values())
    start = time.perf_counter()
    failed, samples = count_failures(await open_sockets(target, sockets, 100,
                                                        Progress("partners: connecting", len(sockets))))
    if failed:
        await close_sockets(sockets)
        raise RuntimeError(f"{failed} of {len(sockets)} sockets did not open: {samples}")
    progress = Progress("partners: messages", total)
    sent = 0

    async def send_all(socket: Socket) -> None:
        nonlocal sent
        name = socket.user.username
        gate = slots[name] = asyncio.Semaphore(window)
        for k, peer in enumerate(outgoing[name]):
            await gate.acquire()
            await socket.send({"type": "send", "to": peer, "body": "hello", "client_id": f"{name}-partner-{k}"})
            sent += 1
            progress.show(sent)
        for _ in range(window):  # every send answered
            await gate.acquire()

    try:
        await asyncio.wait_for(asyncio.gather(*(send_all(s) for s in sockets)), max(60.0, total / 500))
    finally:
        progress.finish()
        await close_sockets(sockets)
    if errors:
        raise RuntimeError(f"{sum(errors.values())} of {total} partner messages refused: {dict(errors)}")
    return {"people": len(users), "edges": len(edges), "each_way": each_way,
            "messages": total, "seconds": time.perf_counter() - start}


class Storm:
    """What each participant knows of their partners' status, and every presence
    frame they got, against what v2 says they must get.

    Phase one (join): everyone connects. Each viewer must come to know every
    partner online: from hello, or else from exactly one `online` frame (a
    partner listed in hello needs none; a frame for them as well is a repeat of
    hello, counted apart, as the two can cross). Phase two (leave): the leavers
    close; every stayer must get exactly one `offline` frame per leaving
    partner. A frame about someone who is not a partner goes to a stranger.
    A phase is over when every tracked viewer knows what it should.
    """

    def __init__(self, partners: Partners) -> None:
        self.partners = partners
        self.expected = dict.fromkeys(partners, "online")
        self.known: dict[str, dict[str, str]] = {}  # viewer -> partner -> status
        self.in_hello: dict[str, set[str]] = {}  # viewer -> partners hello listed online
        self.frames: Counter[tuple[str, str, str]] = Counter()  # (viewer, other, status) -> frames
        self.wrong: dict[str, int] = {}
        self.tracked = set(partners)
        self.leavers: set[str] = set()
        self.complete = 0
        self.done = asyncio.Event()
        self.strangers = 0  # presence frames about someone not a partner of the viewer
        self.hello_strangers = 0  # hello entries of people not partners of the viewer

    def on_hello(self, socket: Socket) -> None:
        me = socket.user.username
        mine = self.partners[me]
        listed = {p["username"]: p["status"] for p in socket.hello.get("presence", [])}
        self.hello_strangers += sum(1 for n in listed if n not in mine)
        self.in_hello[me] = {n for n, status in listed.items() if n in mine and status == "online"}
        self.known[me] = {n: "online" if n in self.in_hello[me] else "offline" for n in mine}
        self.set_wrong(me, self.count_wrong(me))

    def handle(self, socket: Socket, frame: dict, now: float) -> None:
        if frame.get("type") != "presence":
            return
        me, other = socket.user.username, frame.get("username")
        if me not in self.tracked:
            return
        if other not in self.partners[me]:
            self.strangers += 1
            return
        status = frame.get("status")
        self.frames[me, other, status] += 1
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
        """Start phase two: `leavers` are expected offline, and no longer watch."""
        self.leavers = set(leavers)
        for name in leavers:
            self.expected[name] = "offline"
            self.tracked.discard(name)
        self.done.clear()
        self.complete = 0
        self.wrong = {}
        for me in self.tracked & self.known.keys():
            self.set_wrong(me, self.count_wrong(me))

    def stop(self) -> None:
        """Count nothing more (everyone is about to leave)."""
        self.tracked = set()

    def tally(self) -> dict:
        """Frames expected and received over both phases, and how they differ."""
        expected = received = missing = doubled = unexpected = repeats = 0
        for me, mine in self.partners.items():
            hello = self.in_hello.get(me, set())
            staying = me not in self.leavers
            for other in mine:
                want_online = 0 if other in hello else 1
                want_offline = 1 if staying and other in self.leavers else 0
                got_online, got_offline = self.frames[me, other, "online"], self.frames[me, other, "offline"]
                expected += want_online + want_offline
                received += got_online + got_offline
                missing += max(0, want_online - got_online) + max(0, want_offline - got_offline)
                if want_online:
                    doubled += max(0, got_online - 1)
                elif got_online:
                    repeats += 1
                    doubled += got_online - 1
                if want_offline:
                    doubled += max(0, got_offline - 1)
                else:
                    unexpected += got_offline
        return {"frames_expected": expected, "frames_received": received, "missing": missing,
                "duplicates": doubled, "unexpected": unexpected, "repeats_of_hello": repeats,
                "to_strangers": self.strangers, "hello_strangers": self.hello_strangers}


async def presence_storm(target: Target, users: Sequence[User], partners: Partners,
                         timeout_s: float, linger_s: float = 1.0) -> dict:
    """All `users` connect at once; then every second one leaves at once. Each
    phase ends when every remaining user knows each partner's status (it is
    timed to there), plus `linger_s` to catch frames that come twice."""
    storm = Storm(partners)
    sockets = [Socket(u, storm.handle) for u in users]

    async def join(socket: Socket) -> None:
        await socket.open(target.ws_url, timeout=timeout_s)
        storm.on_hello(socket)  # no await since open(): no frame was handled yet

    start = time.perf_counter()
    results = await bounded([lambda s=s: join(s) for s in sockets], len(sockets),
                            Progress("storm: connecting", len(sockets)))
    join_s, join_wrong = await wait_phase(storm, start, timeout_s)
    await asyncio.sleep(linger_s)
    leavers = sockets[1::2]
    storm.leave([s.user.username for s in leavers])
    start = time.perf_counter()
    await close_sockets(leavers)
    leave_s, leave_wrong = await wait_phase(storm, start, timeout_s)
    await asyncio.sleep(linger_s)
    storm.stop()
    await close_sockets(sockets)
    failed, samples = count_failures(results)
    degrees = [len(p) for p in partners.values()]
    return {"users": len(users), "partners_each": max(degrees, default=0),
            "connect_failed": failed, "connect_errors": samples,
            "join_s": join_s, "leave_s": leave_s,
            "total_s": join_s + leave_s if join_s is not None and leave_s is not None else None,
            "wrong_at_timeout": join_wrong + leave_wrong, **storm.tally()}


async def wait_phase(storm: Storm, start: float, timeout_s: float) -> tuple[float | None, int]:
    """(seconds until the storm's phase completed or None, viewer/partner pairs still wrong)."""
    try:
        await asyncio.wait_for(storm.done.wait(), timeout_s)
    except TimeoutError:
        blind = storm.tracked - storm.known.keys()
        return None, sum(storm.wrong.get(me, 0) for me in storm.tracked) + sum(
            len(storm.partners[me]) for me in blind)
    return time.perf_counter() - start, 0


# ---------------------------------------------------------------- directory

Seeder = Callable[[list[str]], Awaitable[None]]  # adds users by name, the server's own fast way


async def time_requests(http: httpx.AsyncClient, viewer: User, queries: dict[str, dict],
                        count: int, warmup: int = 10) -> dict:
    """Each query `count` times, one request at a time, the queries interleaved;
    per query the median and p90 in ms, and what the last answer held."""
    took: dict[str, list[float]] = {name: [] for name in queries}
    answers: dict[str, dict] = {}
    for round_ in range(warmup + count):
        for name, query in queries.items():
            started = time.perf_counter()
            answers[name] = await get_json(http, viewer, query["path"], **query["params"])
            if round_ >= warmup:
                took[name].append((time.perf_counter() - started) * 1000)
    return {name: {"median_ms": statistics.median(ms), "min_ms": min(ms), "p90_ms": percentile(ms, 0.90),
                   "listed": len(answers[name].get("conversations", answers[name].get("users", []))),
                   "has_more": answers[name].get("has_more")}
            for name, ms in took.items()}


async def directory(target: Target, http: httpx.AsyncClient, prefix: str, seed: Seeder,
                    small: int, large: int, conversations: int, requests: int) -> dict:
    """GET /api/conversations and GET /api/users?q= for a user with `conversations`
    conversations, with `small` users in all and then with `large`.

    One user signs up; the others are added by `seed` (straight into ChatX's
    database, or the relay's bulk route), all named `prefix`..., so that a
    search for the prefix has every one of them in its range. Queries:
    conversations (the whole list), search_page (q = the prefix: a full page,
    more beyond), search_after (the same from the middle of the small users,
    by `after`), search_one (q = one full username)."""
    viewer = await register(http, f"{prefix}viewer")
    few = [f"{prefix}u{i:05d}" for i in range(small - 1)]
    started = time.perf_counter()
    await seed(few)
    seed_small_s = time.perf_counter() - started

    partners = few[:conversations]
    await make_partners(target, [viewer], [(viewer.username, p) for p in partners], each_way=False)

    middle, one = few[len(few) // 2], few[min(len(few) - 1, 57)]
    queries = {
        "conversations": {"path": "/api/conversations", "params": {}},
        "search_page": {"path": "/api/users", "params": {"q": prefix}},
        "search_after": {"path": "/api/users", "params": {"q": prefix, "after": middle}},
        "search_one": {"path": "/api/users", "params": {"q": one}},
    }
    expected = {"conversations": (len(partners), False), "search_page": (20, True),
                "search_after": (min(20, len(few) - len(few) // 2 - 1), len(few) - len(few) // 2 - 1 > 20),
                "search_one": (1, False)}
    at_small = await time_requests(http, viewer, queries, requests)

    many = [f"{prefix}s{i:06d}" for i in range(large - small)]
    started = time.perf_counter()
    for chunk in range(0, len(many), 20_000):
        await seed(many[chunk:chunk + 20_000])
    seed_large_s = time.perf_counter() - started
    await asyncio.sleep(1.0)  # whatever the server does after a burst of writes, it does before the timing
    found = await get_json(http, viewer, "/api/users", q=f"{prefix}s", limit=100)
    at_large = await time_requests(http, viewer, queries, requests)

    problems = []
    for size, timings in (("small", at_small), ("large", at_large)):
        for name, (listed, has_more) in expected.items():
            got = timings[name]
            if (got["listed"], got["has_more"]) != (listed, has_more):
                problems.append(f"{name} at {size}: {got['listed']} listed, has_more {got['has_more']}; "
                                f"expected {listed}, {has_more}")
    if many and (len(found["users"]) != min(100, len(many)) or found.get("has_more") != (len(many) > 100)):
        problems.append(f"seeded users not found: q={prefix}s listed {len(found['users'])}, "
                        f"has_more {found.get('has_more')}")
    return {"users_small": small, "users_large": large, "conversations": len(partners),
            "requests": requests, "seed_small_s": seed_small_s, "seed_large_s": seed_large_s,
            "small": at_small, "large": at_large,
            "ratios": {name: at_large[name]["median_ms"] / at_small[name]["median_ms"] for name in queries},
            "problems": problems}
