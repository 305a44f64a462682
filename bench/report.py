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


STORM_ROWS = [
    ("  users x partners each", "users", "{:,.0f}"),
    ("  all online known (s)", "join_s", "{:.2f}"),
    ("  half left known (s)", "leave_s", "{:.2f}"),
    ("  frames expected / received", "frames_expected", "{:,.0f}"),
    ("  missing / duplicates", "missing", "{:,.0f}"),
    ("  strangers / hello repeats", "to_strangers", "{:,.0f}"),
]

DIRECTORY_QUERIES = {"conversations": "GET /api/conversations",
                     "search_page": "GET /api/users?q=prefix",
                     "search_after": "  ... &after=name",
                     "search_one": "GET /api/users?q=name"}

ROWS = [
    Row("throughput (msgs/s)", "throughput.msgs_per_s", ratio="%"),
    Row("  latency p50 (ms)", "throughput.latency.p50_ms", "{:.1f}", "x"),
    Row("  latency p95 (ms)", "throughput.latency.p95_ms", "{:.1f}", "x"),
    Row("  latency p99 (ms)", "throughput.latency.p99_ms", "{:.1f}", "x"),
    Row("  latency max (ms)", "throughput.latency.max_ms", "{:.1f}", "x"),
    Row("  lost", "throughput.lost"),
    Row("  duplicates", "throughput.duplicates"),
    Row("  seq errors / no seq", "throughput.seq_errors"),
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
    Row("  with 99 partners each (kB)", "connections_partners.rss_per_socket_kb", "{:.1f}", "x"),
    Row("presence storm (all partners)", "presence_storm_partners.messages", "{:,.0f} msgs first"),
    *[Row(label, f"presence_storm.{key}", fmt, "x" if key.endswith("_s") else "") for label, key, fmt in STORM_ROWS],
    Row("partner storm", "partner_storm_partners.messages", "{:,.0f} msgs first"),
    *[Row(label, f"partner_storm.{key}", fmt, "x" if key.endswith("_s") else "") for label, key, fmt in STORM_ROWS],
    Row("sign-in: logins", "sign_in.people"),
    Row("  all logins took (s)", "sign_in.logins_s", "{:.2f}"),
    Row("  p50 before / during (ms)", "sign_in.before.p50_ms", "{:.1f}"),
    Row("  p99 before / during (ms)", "sign_in.before.p99_ms", "{:.1f}"),
    Row("uploads: MB/s of 1 MiB images", "uploads.upload_mb_per_s", "{:.1f}"),
    Row("  uploads / failed", "uploads.uploads"),
    Row("  RSS before / peak (MB)", "uploads.rss_before_mb", "{:.0f}"),
    Row("  chat p99 without / during (ms)", "uploads.before.p99_ms", "{:.1f}"),
    Row("  p99 during / without, median", "uploads.p99_ratio", "x{:.2f}"),
    Row("    lowest / highest round", "uploads.p99_ratio_min", "x{:.2f}"),
    Row("  load generator stall (ms)", "uploads.loadgen_stall_max_ms", "{:.1f}"),
    Row("directory: users", "directory.users_small", "{:,.0f}"),
    *[row for key, label in DIRECTORY_QUERIES.items() for row in (
        Row(label[:29], f"directory.small.{key}.median_ms", "{:.2f}"),
        Row("    ms at large / at small", f"directory.ratios.{key}", "x{:.2f}"))],
    Row("  users added in (s)", "directory.seed_large_s", "{:.1f}"),
    Row("users registered in (s)", "register_s", "{:.1f}"),
]

# Rows that show two numbers "a / b": the second path, by the first one's path.
PAIRED = {"connections.failed": "connections.dropped_while_idle",
          "throughput.seq_errors": "throughput.seq_absent",
          "presence_storm.users": "presence_storm.partners_each",
          "presence_storm.frames_expected": "presence_storm.frames_received",
          "presence_storm.missing": "presence_storm.duplicates",
          "presence_storm.to_strangers": "presence_storm.repeats_of_hello",
          "partner_storm.users": "partner_storm.partners_each",
          "partner_storm.frames_expected": "partner_storm.frames_received",
          "partner_storm.missing": "partner_storm.duplicates",
          "partner_storm.to_strangers": "partner_storm.repeats_of_hello",
          "directory.users_small": "directory.users_large",
          **{f"directory.small.{key}.median_ms": f"directory.large.{key}.median_ms" for key in DIRECTORY_QUERIES},
          "sign_in.before.p50_ms": "sign_in.during.p50_ms",
          "sign_in.before.p99_ms": "sign_in.during.p99_ms",
          "uploads.uploads": "uploads.failed_count",
          "uploads.rss_before_mb": "uploads.rss_peak_mb",
          "uploads.before.p99_ms": "uploads.during.p99_ms",
          "uploads.p99_ratio_min": "uploads.p99_ratio_max"}


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


def ratios(data: dict) -> dict:
    """The issue's figures per server: ChatX over the relay, and each server's own
    directory ratios (time at the large size over time at the small one)."""
    servers = {NAMES[k]: v for k, v in data["servers"].items()}
    relay = servers.get("relay", {})
    found = {}
    for name, result in servers.items():
        mine: dict = {}
        if name != "relay":
            for key, path in (("msgs_per_s_vs_relay", "throughput.msgs_per_s"),
                              ("rss_per_idle_socket_vs_relay", "connections.rss_per_socket_kb"),
                              ("rss_per_idle_socket_with_partners_vs_relay",
                               "connections_partners.rss_per_socket_kb"),
                              ("cpu_per_msg_vs_relay", "throughput.server_cpu_us_per_msg")):
                value, base = get(result, path), get(relay, path)
                mine[key] = value / base if measured(value, base) and base else None
        mine["directory_large_over_small"] = get(result, "directory.ratios")
        for storm in ("presence_storm", "partner_storm"):
            if isinstance(result.get(storm), dict) and "users" in result[storm]:
                mine[storm] = {k: result[storm].get(k) for k in (
                    "users", "partners_each", "frames_expected", "frames_received", "missing", "duplicates",
                    "unexpected", "to_strangers", "hello_strangers", "repeats_of_hello", "join_s", "leave_s")}
        found[name] = mine
    return found


def checks(data: dict) -> list[dict]:
    servers = {NAMES[k]: v for k, v in data["servers"].items()}
    relay = servers.get("relay", {})
    found = []
    for rule in (ran_everything, throughput_share, idle_memory, idle_memory_with_partners, ten_thousand_sockets,
                 dense_storm, partner_storm, directory_conversations, directory_search, sign_in_latency,
                 upload_latency):
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
    title = "ChatX SQLite >= 0.70 x relay msgs/s"
    mine, base = get(result, "throughput.msgs_per_s"), get(relay, "throughput.msgs_per_s")
    if not measured(mine, base):
        return check(title, None, "not measured")
    return check(title, mine >= 0.70 * base, f"{mine:,.0f} vs {base:,.0f} msgs/s = x{mine / base:.2f}")


def idle_memory(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    mine, base = get(result, "connections.rss_per_socket_kb"), get(relay, "connections.rss_per_socket_kb")
    title = f"{name}: RSS per idle socket <= 0.85 x relay"
    if not measured(mine, base):
        return check(title, None, "not measured")
    return check(title, mine <= 0.85 * base, f"{mine:.1f} kB vs {base:.1f} kB = x{mine / base:.2f}")


def idle_memory_with_partners(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    path = "connections_partners.rss_per_socket_kb"
    mine, base = get(result, path), get(relay, path)
    title = f"{name}: RSS per idle socket, 99 partners per user, <= 1.0 x relay"
    if not measured(mine, base):
        return check(title, None, "not measured")
    return check(title, mine <= base, f"{mine:.1f} kB vs {base:.1f} kB = x{mine / base:.2f}")


def ten_thousand_sockets(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    title = f"{name}: 10,000 idle sockets, no errors"
    opened = get(result, "connections.opened")
    if opened is None:
        return check(title, None, get(result, "connections.error") or "not measured")
    if sizes["sockets"] < 10_000:
        return check(title, None, f"run with --sockets 10000 (this run: {sizes['sockets']})")
    failed = result["connections"]["failed"] + result["connections"]["dropped_while_idle"]
    return check(title, opened >= 10_000 and failed == 0, f"{opened:,} opened, {failed} failed or dropped")


def storm_check(title: str, storm: dict | None, note: str = "") -> dict:
    """Every presence frame v2 calls for arrived once, none went to a stranger, and
    both phases settled (how fast is reported, not judged)."""
    storm = storm or {}
    if "users" not in storm:
        return check(title, None, storm.get("error", "not measured"))
    settled = storm["join_s"] is not None and storm["leave_s"] is not None
    times = "timed out" if not settled else f"settled in {storm['join_s']:.2f} + {storm['leave_s']:.2f} s"
    bad = {k: storm[k] for k in ("missing", "duplicates", "unexpected", "to_strangers", "hello_strangers",
                                 "connect_failed") if storm.get(k)}
    detail = (f"{storm['users']:,} users x {storm['partners_each']} partners: {times}; "
              f"{storm['frames_received']:,} of {storm['frames_expected']:,} frames expected; "
              + (", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in bad.items()) or "none missing or extra")
              + f"; {storm['repeats_of_hello']:,} repeats of hello" + note)
    return check(title, settled and not bad, detail)


def dense_storm(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    return storm_check(f"{name}: presence storm (everyone partners): every frame once, none to strangers",
                       result.get("presence_storm"))


def partner_storm(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    users, partners = sizes["partner_storm_users"], sizes["partner_storm_partners"]
    note = "" if users >= 2000 and partners >= 20 else " (the target size is 2,000 x 20)"
    return storm_check(f"{name}: partner storm {users:,} users x {partners}: every frame once, none to strangers",
                       result.get("partner_storm"), note)


def directory_ratio(name: str, result: dict, sizes: dict, what: str, keys: list[str]) -> dict:
    title = (f"{name}: {what} at {sizes['directory_users']:,} users <= 2 x at {sizes['directory_small']:,}")
    found = result.get("directory") or {}
    given = {k: get(found, f"ratios.{k}") for k in keys}
    if not all(measured(v) for v in given.values()):
        return check(title, None, found.get("error", "not measured"))
    parts = [f"{k} {get(found, f'small.{k}.median_ms'):.2f} -> {get(found, f'large.{k}.median_ms'):.2f} ms "
             f"= x{v:.2f}" for k, v in given.items()]
    problems = [p for p in found.get("problems", []) if any(p.startswith(k) for k in keys) or "seeded" in p]
    if sizes["directory_users"] < 100_000:
        parts.append("the target size is 100,000")
    return check(title, all(v <= 2 for v in given.values()) and not problems, "; ".join(parts + problems))


def directory_conversations(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    return directory_ratio(name, result, sizes, "GET /api/conversations", ["conversations"])


def directory_search(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    return directory_ratio(name, result, sizes, "GET /api/users?q=",
                           ["search_page", "search_after", "search_one"])


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


def upload_latency(name: str, result: dict, relay: dict, sizes: dict) -> dict:
    """Uploads are streamed and images decoded off the event loop: messages
    must not wait behind them."""
    before, during = get(result, "uploads.before.p99_ms"), get(result, "uploads.during.p99_ms")
    ratio, lowest, highest = (get(result, f"uploads.p99_ratio{end}") for end in ("", "_min", "_max"))
    title = f"{name}: chat p99 during uploads <= 2x p99 without (median of the rounds)"
    if not measured(before, during, ratio):
        return check(title, None, "not measured")
    growth, failed = get(result, "uploads.rss_growth_mb"), get(result, "uploads.failed_count") or 0
    return check(title, ratio <= 2 and failed == 0,
                 f"x{ratio:.2f} (rounds x{lowest:.2f} to x{highest:.2f}; the median round {before:.1f} ms "
                 f"without, {during:.1f} ms during); "
                 f"{get(result, 'uploads.upload_mb_per_s'):.1f} MB/s uploaded, RSS +{growth:.0f} MB, "
                 f"{failed} uploads failed")


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
    """Throughput, latency percentiles at full and fixed load, and the directory's
    ratios (time at the large size over time at the small one), per server."""
    servers = {NAMES[k]: v for k, v in data["servers"].items() if v.get("status") == "ok"}
    names = list(servers)
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
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
    bars(middle, names, servers, series)
    if any(pick(r) for _, pick in series for r in servers.values()):
        middle.set_yscale("log")
    middle.set_ylabel("ms")
    middle.set_title("message latency (send -> partner's frame)")
    bars(right, names, servers, [(key, lambda r, key=key: get(r, f"directory.ratios.{key}"))
                                 for key in DIRECTORY_QUERIES])
    right.axhline(2, color="#c44e52", linestyle="--", linewidth=1)
    right.set_title(f"directory: time at {data['sizes']['directory_users']:,} users / "
                    f"at {data['sizes']['directory_small']:,} (target <= 2)")
    figure.suptitle(f"ChatX benchmark {data['started']}{' (quick)' if data['quick'] else ''}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def bars(axes, names: list[str], servers: dict, series: list[tuple[str, Callable[[dict], float | None]]]) -> None:
    width = 0.8 / len(series)
    for i, (label, pick) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(names))]
        axes.bar(xs, [pick(r) or float("nan") for r in servers.values()], width, label=label)
    axes.set_xticks(range(len(names)), names)
    axes.legend(fontsize=8)
