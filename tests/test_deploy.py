"""docs/deploy.md, proven: Debian's nginx terminates TLS (a self-signed
certificate made with `openssl`) in front of two ChatX processes that share a
PostgreSQL database and a Redis, and two people chat through https:// in
Chromium.

nginx runs from a configuration in the test's own directory (`daemon off`,
pid, logs and temporary files all there), so nothing under /etc or /var is
touched. The nginx configuration below is the one docs/deploy.md shows, with
the test's paths and ports: its `map` and `location /` blocks are read from
the document itself, so the configuration people copy is the one tested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import textwrap
from pathlib import Path
from typing import Iterator

import httpx2 as httpx
import pytest
from playwright.sync_api import expect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import chatx
from conftest import PASSWORD, ROOT, ChatServer, RedisServer, free_port, fresh_postgres_database, wait_until
from test_browser import bubble, expect_presence, open_chat, start_chat, unique

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
CHROMIUM = "/usr/bin/chromium"
EVIL = "https://evil.example"

expect.set_options(timeout=15_000)


def require(path: str, package: str) -> None:
    if not os.access(path, os.X_OK):
        message = f"{path} is missing: `make test` installs Debian's {package} package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# ---- the pieces docs/deploy.md sets up ---------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """As docs/deploy.md makes it: `openssl req -x509`, for 127.0.0.1."""
    cert, key = directory / "chatx.crt", directory / "chatx.key"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


NGINX_CONF = """\
# The test's own nginx: everything it writes stays in {prefix}.
daemon off;
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;

events {{
    worker_connections 512;
}}

http {{
    log_format upstreams '$remote_addr "$request" $status upstream=$upstream_addr';
    access_log {prefix}/access.log upstreams;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    # --- from docs/deploy.md ---
{map_block}

    upstream chatx {{
        server 127.0.0.1:{port_a};
        server 127.0.0.1:{port_b};
    }}

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name 127.0.0.1;

        ssl_certificate     {cert};
        ssl_certificate_key {key};

{location_block}
    }}
}}
"""


def documented_nginx_blocks() -> tuple[str, str]:
    """The `map` block and the `location /` block of docs/deploy.md's nginx site."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    [site] = re.findall(r"```nginx\n(.*?)```", doc, re.S)
    map_block = re.search(r"^map \$http_upgrade .*?^}\n", site, re.S | re.M)
    location = re.search(r"^    location / \{\n.*?^    }\n", site, re.S | re.M)
    assert map_block and location, site
    assert "proxy_pass http://chatx;" in location.group(0)
    return textwrap.indent(map_block.group(0), "    "), textwrap.indent(location.group(0), "    ")


class Nginx:
    """nginx in the foreground, from a configuration in `prefix`."""

    def __init__(self, prefix: Path, upstreams: list[ChatServer]) -> None:
        self.prefix = prefix
        self.port = free_port()
        cert, key = self_signed_certificate(prefix)
        self.conf = prefix / "nginx.conf"
        map_block, location_block = documented_nginx_blocks()
        self.conf.write_text(NGINX_CONF.format(
            map_block=map_block, location_block=location_block, prefix=prefix, port=self.port,
            port_a=upstreams[0].port, port_b=upstreams[1].port, cert=cert, key=key,
            # As root, nginx's workers would otherwise run as `nobody`, who cannot enter pytest's 0700 directories.
            user="user root;" if os.geteuid() == 0 else "",
        ))
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def start(self) -> None:
        checked = subprocess.run([NGINX, "-t", "-c", str(self.conf), "-p", str(self.prefix), "-e",
                                  str(self.prefix / "error.log")], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        with open(self.prefix / "nginx.out", "ab") as out:
            self.process = subprocess.Popen(
                [NGINX, "-c", str(self.conf), "-p", str(self.prefix), "-e", str(self.prefix / "error.log")],
                stdout=out, stderr=subprocess.STDOUT,
            )
        wait_until(self.answers, timeout=10, what=f"nginx on port {self.port}")

    def answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"nginx exited: {(self.prefix / 'error.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.base}/healthz", verify=False, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish and exit
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Nginx, list[ChatServer]]]:
    """docs/deploy.md's setup: nginx with TLS, two ChatX processes, PostgreSQL, Redis."""
    require(NGINX, "nginx")
    require(OPENSSL, "openssl")
    require(CHROMIUM, "chromium")
    redis = RedisServer(tmp_path)
    servers: list[ChatServer] = []
    proxy: Nginx | None = None
    with fresh_postgres_database() as database_url:
        redis.start()
        try:
            env = {
                "CHATX_DATABASE_URL": database_url,
                "CHATX_BROADCAST_URL": redis.url,
                "CHATX_TRUSTED_PROXIES": "127.0.0.1",
                "CHATX_ALLOWED_HOSTS": "127.0.0.1",
                "CHATX_PRESENCE_GRACE": "0",
                # uvicorn believes 127.0.0.1's X-Forwarded-* by itself (--forwarded-allow-ips), and ChatX
                # puts its own peer back; trust nobody there, so that CHATX_TRUSTED_PROXIES alone is what this
                # test proves.
                "FORWARDED_ALLOW_IPS": "",
            }
            for _ in range(2):
                server = ChatServer(env, tmp_path)
                servers.append(server)
                server.start()
            proxy = Nginx(tmp_path, servers)
            proxy.start()
            yield proxy, servers
        finally:
            if proxy is not None:
                proxy.stop()
            for server in servers:
                server.stop()
            redis.stop()


# ---- what a person does ----------------------------------------------------------------


def sign_up(context, base: str, username: str):
    page = context.new_page()
    page.goto(base + "/register")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(base + "/")
    expect(page.get_by_text("Connecting…")).to_be_hidden()
    return page


def send(page, text: str) -> None:
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


def session_cookie(context) -> dict:
    """Over https the session cookie has the __Host- prefix: Secure, Path=/, no Domain."""
    assert not [c for c in context.cookies() if c["name"] == chatx.SESSION_COOKIE]
    [cookie] = [c for c in context.cookies() if c["name"] == chatx.SECURE_SESSION_COOKIE]
    return cookie


def insecure_tls() -> ssl.SSLContext:
    """The client side of a self-signed certificate: no verification."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# ---- the test ---------------------------------------------------------------------------


def test_two_people_chat_through_nginx_over_https_with_secure_cookies_and_foreign_origins_refused(deployment, browser):
    proxy, servers = deployment
    problems: list[str] = []
    alice, bob = unique("alice"), unique("bob")
    # The certificate is self-signed: as --ignore-certificate-errors would.
    contexts = [browser.new_context(viewport={"width": 1280, "height": 800}, ignore_https_errors=True)
                for _ in range(2)]
    try:
        for context in contexts:
            context.on("page", lambda page: page.on("pageerror", lambda error: problems.append(str(error))))
        alice_page = sign_up(contexts[0], proxy.base, alice)
        bob_page = sign_up(contexts[1], proxy.base, bob)

        # The proxy said https, ChatX believed it (CHATX_TRUSTED_PROXIES): the cookie is Secure.
        for context in contexts:
            cookie = session_cookie(context)
            assert cookie["secure"] is True, cookie
            assert cookie["httpOnly"] is True, cookie
            assert cookie["sameSite"] == "Lax", cookie
            assert cookie["path"] == "/" and not cookie["domain"].startswith("."), cookie

        # alice finds bob through the search; a first message makes them contacts, both online.
        start_chat(alice_page, bob)
        send(alice_page, "Hello over TLS")
        expect(bubble(alice_page, "Hello over TLS")).to_be_visible()
        expect_presence(alice_page, bob, "online")
        expect_presence(bob_page, alice, "online")

        open_chat(bob_page, alice)
        expect(bubble(bob_page, "Hello over TLS")).to_be_visible()
        send(bob_page, "Loud and clear")
        expect(bubble(alice_page, "Loud and clear")).to_be_visible()
        expect(bubble(alice_page, "Loud and clear")).to_have_class(re.compile(r"\btheirs\b"))
        send(alice_page, "Both ways, then")
        expect(bubble(bob_page, "Both ways, then")).to_be_visible()

        # A file over nginx's default 1 MiB body limit goes through (client_max_body_size), byte for byte.
        data = os.urandom(3 * 2**20)
        uploaded = alice_page.request.post(f"{proxy.base}/api/attachments?name=big.bin", data=data,
                                           headers={"content-type": "application/octet-stream"})
        assert uploaded.status == 201, uploaded.text()
        attachment = uploaded.json()["attachment"]
        assert alice_page.request.get(f"{proxy.base}/api/attachments/{attachment['id']}").body() == data

        # Presence through the proxy: bob leaves (no grace), alice sees it; he comes back, online again.
        bob_page.close()
        expect_presence(alice_page, bob, "offline")
        bob_page = contexts[1].new_page()
        bob_page.goto(proxy.base + "/")
        expect(bob_page.get_by_text("Connecting…")).to_be_hidden()
        expect_presence(alice_page, bob, "online")
        expect_presence(bob_page, alice, "online")

        # nginx upgraded the sockets, and spread the requests over both processes.
        log_lines = (proxy.prefix / "access.log").read_text().splitlines()
        assert any('"GET /ws' in line and " 101 " in line for line in log_lines), log_lines[-20:]
        upstreams = {line.rsplit(" upstream=", 1)[1] for line in log_lines if " upstream=" in line}
        assert {f"127.0.0.1:{server.port}" for server in servers} <= upstreams, upstreams

        cookie = session_cookie(contexts[1])["value"]
    finally:
        for context in contexts:
            context.close()
    assert problems == []

    # A foreign Origin is refused through the proxy, before anything is accepted: the socket ...
    headers = {"Cookie": f"{chatx.SECURE_SESSION_COOKIE}={cookie}"}
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{proxy.ws_base}/ws", ssl=insecure_tls(), origin=EVIL, additional_headers=headers,
                open_timeout=10)
    assert refused.value.response.status_code == 403
    # ... while the same cookie from the page's own origin is let in (so the 403 was the Origin).
    with connect(f"{proxy.ws_base}/ws", ssl=insecure_tls(), origin=proxy.base, additional_headers=headers,
                 open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello" and hello["user"]["username"] == bob

    # ... and a state-changing request: a foreign page cannot sign bob out.
    foreign = httpx.post(f"{proxy.base}/api/logout", headers={**headers, "Origin": EVIL}, verify=False, timeout=10)
    assert foreign.status_code == 403, foreign.text
    assert foreign.json()["error"]["code"] == "forbidden"
    me = httpx.get(f"{proxy.base}/api/me", headers=headers, verify=False, timeout=10)
    assert me.status_code == 200 and me.json()["user"]["username"] == bob

    # CHATX_ALLOWED_HOSTS: a Host the deployment does not serve is refused.
    other_host = httpx.get(f"{proxy.base}/healthz", headers={"Host": "evil.example"}, verify=False, timeout=10)
    assert other_host.status_code == 400

    # The page's own origin signs out fine.
    own = httpx.post(f"{proxy.base}/api/logout", headers={**headers, "Origin": proxy.base}, verify=False,
                     timeout=10)
    assert own.status_code == 204
    assert httpx.get(f"{proxy.base}/api/me", headers=headers, verify=False, timeout=10).status_code == 401



# ---- the documented scrape ---------------------------------------------------------------


def documented_settings() -> dict[str, str]:
    """The variables of docs/deploy.md's /etc/chatx/chatx.env."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    [block] = [b for b in re.findall(r"```\n(.*?)```", doc, re.S) if b.startswith("# /etc/chatx/chatx.env")]
    return dict(line.split("=", 1) for line in block.splitlines() if line and not line.startswith("#"))


def documented_scrape_targets() -> list[str]:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    [config] = re.findall(r"```yaml\n# prometheus.yml\n(.*?)```", doc, re.S)
    return re.findall(r'"(127\.0\.0\.1:\d+)"', config)


def test_the_documented_prometheus_scrape_and_health_check_work_with_the_documented_settings(tmp_path):
    """Issue 23.9: with CHATX_ALLOWED_HOSTS=chat.example.com the scrape of
    127.0.0.1:8001 that the same document configures was answered 400."""
    settings = documented_settings()
    assert settings["CHATX_ALLOWED_HOSTS"] == "chat.example.com" and settings["CHATX_METRICS"] == "true"
    targets = documented_scrape_targets()
    assert targets[0] == "127.0.0.1:8001", targets
    server = ChatServer({**settings, "CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
                         "CHATX_BROADCAST_URL": "memory://", "CHATX_LOG_FORMAT": "text"}, tmp_path)
    server.start()  # its readiness check is a GET /healthz with Host 127.0.0.1:<port>, as Prometheus's
    try:
        # As Prometheus asks: the target's address and port as the Host.
        scrape = httpx.get(f"{server.base}/metrics", timeout=10)
        assert scrape.status_code == 200, scrape.text
        assert "chatx_open_sockets" in scrape.text
        assert httpx.get(f"{server.base}/healthz", timeout=10).status_code == 200
        # Anything else still needs the chat's name...
        assert httpx.get(f"{server.base}/login", timeout=10).status_code == 400
        assert httpx.get(f"{server.base}/login", headers={"Host": "chat.example.com"}, timeout=10).status_code == 200
        # ... and so does what comes through the proxy (nginx adds X-Forwarded-For), /metrics and /healthz too.
        via_proxy = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
        for path in ("/metrics", "/healthz"):
            assert httpx.get(f"{server.base}{path}", headers=via_proxy, timeout=10).status_code == 400
        named = httpx.get(f"{server.base}/metrics", headers={**via_proxy, "Host": "chat.example.com"}, timeout=10)
        assert named.status_code == 403  # the browser's address may not read metrics
    finally:
        server.stop()
