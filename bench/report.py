"""Turn benchmark results into a terminal table, target checks, JSON and a PNG chart."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

CHATX = ("chatx-sqlite", "chatx-postgres")
LOADGEN_SATURATED = 0.85  # share of its core above which the load generator may be the limit
NAMES = {"relay": "relay", "sqlite": "chatx-sqlite", "postgres": "chatx-postgres"}


def get(result: dict, path: str):
    """result["a"]["b"] for path "a.b", or None when any part is missing."""
    value = result
    for key in path.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


@dataclass
class Row:
    label: str
    path: str
    fmt: str = "{:,.0f}"
    ratio: str = ""  # "%": share of the relay (higher is better); "x": multiple of it


ROWS = [
    Row("throughput (msgs/s)", "throughput.msgs_per_s", ratio="%"),
    Row("  latency p50 (ms)", "throughput.latency.p50_ms", "{:.1f}", "x"),
    Row("  latency p95 (ms)", "throughput.latency.p95_ms", "{:.1f}", "x"),
    Row("  latency p99 (ms)", "throughput.latency.p99_ms", "{:.1f}", "x"),
    Row("  latency max (ms)", "throughput.latency.max_ms", "{:.1f}", "x"),
    Row("  lost", "throughput.lost"),
    Row("  duplicates", "throughput.duplicates"),
    Row("  server CPU per msg (us)", "throughput.server_cpu_us_per_msg", "{:.0f}", "x"),
    Row("  server core busy", "throughput.server_cpu_busy", "{:.0%}"),
    Row("  load generator core busy", "throughput.loadgen_cpu_busy", "{:.0%}"),
    Row("fixed rate offered (msgs/s)", "fixed_rate.offered_per_s"),
    Row("  delivered (msgs/s)", "fixed_rate.delivered_per_s"),
    Row("  latency p50 (ms)", "fixed_rate.latency.p50_ms", "{:.1f}", "x"),
    Row("  latency p99 (ms)", "fixed_rate.latency.p99_ms", "{:.1f}", "x"),
    Row("  lost", "fixed_rate.lost"),
    Row("  load generator stall (ms)", "fixed_rate.loadgen_stall_max_ms", "{:.1f}"),
    Row("idle sockets opened", "connections.opened"),
    Row("  failed / dropped", "connections.failed"),
    Row("  connects/s", "connections.connects_per_s", ratio="%"),
    Row("  RSS per socket (kB)", "connections.rss_per_socket_kb", "{:.1f}", "x"),
    Row("presence storm users", "presence_storm.users"),
    Row("  all online known (s)", "presence_storm.join_s", "{:.2f}", "x"),
    Row("  half left known (s)", "presence_storm.leave_s", "{:.2f}", "x"),
    Row("  missing / duplicates", "presence_storm.missing"),
    Row("sign-in: logins", "sign_in.people"),
    Row("  all logins took (s)", "sign_in.logins_s", "{:.2f}"),
    Row("  p50 before / during (ms)", "sign_in.before.p50_ms", "{:.1f}"),
    Row("  p99 before / during (ms)", "sign_in.before.p99_ms", "{:.1f}"),
    Row("users registered in (s)", "register_s", "{:.1f}"),
]

# Rows that show two numbers "a / b": the second path, by the first one's path.
PAIRED = {"connections.failed": "connections.dropped_while_idle",
          "presence_storm.missing": "presence_storm.duplicates",
          "sign_in.before.p50_ms": "sign_in.during.p50_ms",
          "sign_in.before.p99_ms": "sign_in.during.p99_ms"}


def cell(row: Row, result: dict, relay: dict) -> str:
    value = get(result, row.path)
    if value is None:
        return "-"
    text = row.fmt.format(value)
    if row.path in PAIRED:
        second = get(result, PAIRED[row.path])
        text += " / " + ("-" if second is None else row.fmt.format(second))
    base = get(relay, row.path)
    if row.ratio and base and result is not relay:
        text += f" ({value / base:.0%})" if row.ratio == "%" else f" (x{value / base:.2f})"
    return text


def table(data: dict) -> str:
    servers = {NAMES[k]: v for k, v in data["servers"].items()}
    relay = servers.get("relay", {})
    widths = [30] + [24] * len(servers)
    lines = ["", "".join(h.ljust(w) for h, w in zip(["", *servers], widths, strict=True))]
    for row in ROWS:
        cells = [row.label] + [cell(row, r, relay) for r in servers.values()]
        lines.append("".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    for name, result in servers.items():
        if result.get("status") != "ok":
            lines.append(f"{name}: {result['status']}: {(result.get('error') or '').split(chr(10))[0]}")
        for workload, value in result.items():
            if isinstance(value, dict) and "error" in value:
                lines.append(f"{name} {workload}: {value['error']}")
        for workload, value in result.items():
            busy = get(value, "loadgen_cpu_busy") if isinstance(value, dict) else None
            if busy is not None and busy >= LOADGEN_SATURATED:
                lines.append(f"note: load generator {busy:.0%} busy in {name} {workload}: "
                             "that server may be faster than shown there")
    load = data["environment"]["load_average_before"]
    if load >= 0.5:
        lines.append(f"note: the machine was already busy (load average {load:.1f}): numbers are noisy")
    lines.append("relay: in memory, no database, no broker, no password hashing (register/login are instant).")
    lines.append(f"sizes: {data['sizes']}{'  (--quick)' if data['quick'] else ''}")
    return "\n".join(lines)


# ---------------------------------------------------------------- targets

def check(name: str, passed: bool | None, detail: str) -> dict:
    status = "SKIP" if passed is None else "PASS" if passed else "FAIL"
    return {"name": name, "status": status, "detail": detail}


def measured(*values) -> bool:
    return all(v is not None for v in values)


def checks(data: dict) -> list[dict]:
    servers = {NAMES[k]: v for k, v in data["servers"].items()}
    relay = servers.get("relay", {})
    found = []
    for rule in (ran_everything, throughput_share, fixed_rate_p99, idle_memory, ten_thousand_sockets,
                 storm_of_thousand, sign_in_latency):
        for name in CHATX:
            if name in servers:
                found.append(rule(name, servers[name], relay, data["sizes"]))
    if "chatx-sqlite" in servers and "chatx-postgres" in servers:
        found.append(postgres_vs_sqlite(servers["chatx-sqlite"], servers["chatx-postgres"]))
    return [c for c in found if c is not None]


def ran_everything(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    broken = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    if result.get("status") == "skipped":
        return check(f"{name}: ran every workload", None, result["error"])
    if result.get("status") != "ok":
        return check(f"{name}: ran every workload", False, result["error"].split("\n")[0])
    return check(f"{name}: ran every workload", not broken,
                 f"errors in {', '.join(broken)}" if broken else "no server or workload errors")


def throughput_share(name: str, result: dict, relay: dict, sizes: dict) -> dict | None:
    if name != "chatx-sqlite":
        return None
    mine, base = get(result, "throughput.msgs_per_s"), get(relay, "throughput.msgs_per_s")
    if not measured(mine, base):
        return check("ChatX SQLite >= 25 % of relay msgs/s", None, "not measured")
    return check("ChatX SQLite >= 25 % of relay msgs/s", mine >= 0.25 * base,
                 f"{mine:,.0f} vs {base:,.0f} msgs/s = {mine / base:.0%}")


def fixed_rate_p99(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    p99, rate = get(result, "fixed_rate.latency.p99_ms"), get(result, "fixed_rate.offered_per_s")
    title = f"{name}: p99 at fixed rate <= 20 ms"
    if not measured(p99, rate):
        return check(title, None, "not measured")
    lost = get(result, "fixed_rate.lost") or 0
    detail = f"p99 {p99:.1f} ms at {rate:,.0f} msgs/s, {lost} lost"
    stall = get(result, "fixed_rate.loadgen_stall_max_ms")
    if stall is not None:
        detail += f"; the load generator's loop stalled at most {stall:.1f} ms"
    return check(title, p99 <= 20 and lost == 0, detail)


def idle_memory(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    mine, base = get(result, "connections.rss_per_socket_kb"), get(relay, "connections.rss_per_socket_kb")
    title = f"{name}: RSS per idle socket <= 1.2 x relay"
    if not measured(mine, base):
        return check(title, None, "not measured")
    return check(title, mine <= 1.2 * base, f"{mine:.1f} kB vs {base:.1f} kB = x{mine / base:.2f}")


def ten_thousand_sockets(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    title = f"{name}: 10,000 idle sockets, no errors"
    opened = get(result, "connections.opened")
    if sizes["sockets"] < 10_000 or opened is None:
        return check(title, None, f"run with --sockets 10000 (this run: {sizes['sockets']})")
    failed = result["connections"]["failed"] + result["connections"]["dropped_while_idle"]
    return check(title, opened >= 10_000 and failed == 0, f"{opened:,} opened, {failed} failed or dropped")


def storm_of_thousand(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    title = f"{name}: presence storm of 1,000 users within 10 s, none missing or duplicated"
    storm = result.get("presence_storm") or {}
    if "users" not in storm:
        return check(title, None, "not measured")
    total = storm["total_s"]
    detail = (f"{storm['users']} users: {'timed out' if total is None else f'{total:.2f} s'}, "
              f"{storm['missing']} missing, {storm['duplicates']} duplicates")
    if storm["users"] < 1000:
        return check(title, None, detail + " (run with --storm-users 1000)")
    passed = total is not None and total <= 10 and storm["missing"] == 0 and storm["duplicates"] == 0
    return check(title, passed, detail)


def sign_in_latency(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    """Bench rule, not a spec number: one scrypt hash takes ~100 ms, so a hash on
    the event loop would push p99 during sign-in far above p99 before it."""
    before, during = get(result, "sign_in.before.p99_ms"), get(result, "sign_in.during.p99_ms")
    title = f"{name}: chat p99 during sign-ins <= p99 before + 50 ms"
    if not measured(before, during):
        return check(title, None, "not measured")
    failed = get(result, "sign_in.logins_failed") or 0
    return check(title, during <= before + 50 and failed == 0,
                 f"{before:.1f} ms before, {during:.1f} ms during, {failed} logins failed")


def postgres_vs_sqlite(sqlite: dict, postgres: dict) -> dict:
    title = "PostgreSQL within a factor 2 of SQLite throughput"
    lite, pg = get(sqlite, "throughput.msgs_per_s"), get(postgres, "throughput.msgs_per_s")
    if not measured(lite, pg):
        return check(title, None, "not measured")
    return check(title, pg >= lite / 2, f"{pg:,.0f} vs {lite:,.0f} msgs/s = {pg / lite:.0%}")


def check_lines(found: list[dict]) -> str:
    return "\n".join(["", "targets:"] + [f"  [{c['status']}] {c['name']}: {c['detail']}" for c in found])


# ---------------------------------------------------------------- files

def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def chart(path: Path, data: dict) -> None:
    """Throughput, and latency percentiles at full and fixed load, per server."""
    servers = {NAMES[k]: v for k, v in data["servers"].items() if v.get("status") == "ok"}
    names = list(servers)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = [get(r, "throughput.msgs_per_s") or 0 for r in servers.values()]
    left.bar(names, rates, color="#4c72b0")
    left.set_title("throughput (delivered msgs/s)")
    for x, rate in enumerate(rates):
        left.annotate(f"{rate:,.0f}", (x, rate), ha="center", va="bottom")
    series: list[tuple[str, Callable[[dict], float | None]]] = [
        ("max load p50", lambda r: get(r, "throughput.latency.p50_ms")),
        ("max load p95", lambda r: get(r, "throughput.latency.p95_ms")),
        ("max load p99", lambda r: get(r, "throughput.latency.p99_ms")),
        ("fixed rate p50", lambda r: get(r, "fixed_rate.latency.p50_ms")),
        ("fixed rate p99", lambda r: get(r, "fixed_rate.latency.p99_ms")),
    ]
    width = 0.8 / len(series)
    for i, (label, pick) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(names))]
        right.bar(xs, [pick(r) or float("nan") for r in servers.values()], width, label=label)
    right.set_xticks(range(len(names)), names)
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title("message latency (send -> partner's frame)")
    right.legend(fontsize=8)
    figure.suptitle(f"ChatX benchmark {data['started']}{' (quick)' if data['quick'] else ''}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
