"""The browser client, driven through Debian's Chromium against a real uvicorn.

Each test starts from people signing up or in through the pages, as a person
would; Playwright's `expect` waits for what should appear, so no test sleeps.
Set CHATX_SCREENSHOTS=<dir> to save the screenshots of the README and docs
there (test_the_screenshots_show_people_by_name_in_daytime_with_emoji_in_colour
makes them): `CHATX_SCREENSHOTS=docs .venv/bin/python -m pytest
tests/test_browser.py -k screenshots`.
"""

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import chatx
import httpx2 as httpx
import pytest
from playwright.sync_api import expect

from conftest import PASSWORD, ROOT, ChatServer, free_port, receive, remote_sign_up, wait_until

SCREENSHOTS = os.environ.get("CHATX_SCREENSHOTS")

expect.set_options(timeout=10_000)


# ---- fixtures -------------------------------------------------------------------


# Generous send limits: the seeding below sends 120 messages at once. No
# presence grace: closing a page shows its user offline at once. Every test
# signs people up from one address: no limit on that.
SEED_LIMITS = {"CHATX_SEND_RATE": "1000", "CHATX_SEND_BURST": "1000"}
NO_GRACE = {"CHATX_PRESENCE_GRACE": "0"}
SIGNUPS = {"CHATX_SIGNUPS_PER_ADDRESS": "0"}


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """One server for the tests that need no restart (each uses new names)."""
    workdir = tmp_path_factory.mktemp("chatx")
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{workdir / 'chat.db'}", **SEED_LIMITS, **NO_GRACE,
                         **SIGNUPS}, workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def new_context(browser):
    """Makes browser contexts (one per person); fails the test on any uncaught
    script error or Content-Security-Policy violation in their pages."""
    contexts, problems = [], []

    def watch(page):
        page.on("pageerror", lambda error: problems.append(f"{page.url}: {error}"))
        page.on("console", lambda message: "Content Security Policy" in message.text
                and problems.append(f"{page.url}: {message.text}"))

    def make(**options):
        options.setdefault("viewport", {"width": 1280, "height": 800})
        context = browser.new_context(**options)
        context.on("page", watch)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()
    assert problems == []


# ---- what a person does ---------------------------------------------------------


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:6]}"


def snap(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), animations="disabled")


def sign_up(context, server, username):
    page = context.new_page()
    page.goto(server.base + "/register")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(server.base + "/")
    expect(page.get_by_text("Connecting…")).to_be_hidden()
    return page


def sign_in(context, server, username):
    page = context.new_page()
    page.goto(server.base + "/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(server.base + "/")
    return page


def contacts(page):
    return page.get_by_role("list", name="Contacts")


def contact(page, username):
    return contacts(page).get_by_role("listitem").filter(has=page.get_by_text(username, exact=True))


def expect_presence(page, username, status):
    other = {"online": "offline", "offline": "online"}[status]
    expect(contact(page, username).get_by_text(status, exact=True)).to_have_count(1)
    expect(contact(page, username).get_by_text(other, exact=True)).to_have_count(0)


def messages(page):
    return page.get_by_role("log", name="Messages")


def open_chat(page, username):
    contact(page, username).get_by_role("button").click()
    expect(messages(page)).to_be_visible()
    expect(page.get_by_role("heading", name=username)).to_be_visible()


def people(page):
    return page.get_by_role("list", name="People")


def find_person(page, username, query=None):
    """Search the directory; the person found, in the People list."""
    page.get_by_role("searchbox", name="Search people").fill(query or username)
    found = people(page).get_by_role("listitem").filter(has=page.get_by_text(username, exact=True))
    expect(found).to_have_count(1)
    return found


def start_chat(page, username):
    """Open a conversation with someone who is not a contact yet, through the search."""
    find_person(page, username).get_by_role("button").click()
    expect(messages(page)).to_be_visible()
    expect(page.get_by_role("heading", name=username)).to_be_visible()


def send(page, text):
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def bubble(page, text):
    """The message whose text is `text` (not a reply that quotes it)."""
    return (messages(page).locator(".msg").filter(has=page.get_by_text(text, exact=True))
            .filter(has_not=page.locator(".quote").get_by_text(text, exact=True)))


def chatting(server, new_context, *texts):
    """alice and bob, new, each on a page of their own: alice finds bob and
    sends `texts`, then bob opens the conversation. (alice, bob, their pages)."""
    alice, bob = unique("alice"), unique("bob")
    alice_page = sign_up(new_context(), server, alice)
    bob_page = sign_up(new_context(), server, bob)
    start_chat(alice_page, bob)
    for text in texts:
        send(alice_page, text)
    open_chat(bob_page, alice)
    return alice, bob, alice_page, bob_page


AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"


def check_accessibility(page, state: str) -> None:
    """axe-core (npm, pinned in package-lock.json; `make test` installs it) on
    the page as it is now: no serious or critical violation."""
    assert AXE.exists(), "axe-core is missing: run `make test`, or `npm ci` at the top of the repository"
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text() + "\n;undefined")  # DevTools evaluation: the page's CSP does not apply
    violations = page.evaluate("""async () => {
        const result = await axe.run(document, { resultTypes: ["violations"] });
        return result.violations.filter((v) => v.impact === "serious" || v.impact === "critical")
            .map((v) => ({ id: v.id, impact: v.impact, help: v.help,
                           nodes: v.nodes.slice(0, 5).map((n) => n.target.join(" ") + " " + n.failureSummary) }));
    }""")
    assert violations == [], f"{state}: {json.dumps(violations, indent=1)}"


def open_menu(page, text):
    """The menu of one message (hovered first, as a mouse would)."""
    target = bubble(page, text)
    target.hover()
    target.get_by_role("button", name=re.compile("^Actions for")).click()
    expect(page.get_by_role("menu")).to_be_visible()
    return page.get_by_role("menu")


# ---- tests ----------------------------------------------------------------------


def test_pages_show_specific_inline_errors_and_link_to_each_other(chat_server, new_context):
    page = new_context().new_page()
    taken = unique("taken")
    httpx.post(chat_server.base + "/api/register", json={"username": taken, "password": PASSWORD}).raise_for_status()

    page.goto(chat_server.base + "/login")
    page.get_by_role("link", name="Create account").click()
    expect(page).to_have_url(chat_server.base + "/register")
    username, password = page.get_by_label("Username"), page.get_by_label("Password")
    create = page.get_by_role("button", name="Create account")

    username.fill("no spaces please")
    password.fill(PASSWORD)
    create.click()
    expect(page.get_by_text("Use 3–32 letters")).to_be_visible()
    expect(username).to_have_attribute("aria-invalid", "true")

    username.fill(unique("carol"))
    password.fill("short")
    create.click()
    expect(page.get_by_text("at least 8 characters", exact=False).last).to_be_visible()
    expect(password).to_have_attribute("aria-invalid", "true")

    username.fill(taken.upper())  # names are unique regardless of case
    password.fill(PASSWORD)
    create.click()
    expect(page.get_by_text("That username is taken")).to_be_visible()

    page.get_by_role("link", name="Sign in").click()
    expect(page).to_have_url(chat_server.base + "/login")
    page.get_by_label("Username").fill(taken)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Wrong username or password.")).to_be_visible()
    expect(page).to_have_url(chat_server.base + "/login")


def test_two_people_see_each_other_online_chat_both_ways_with_typing_read_ticks_and_unread(
        chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    alice_page = sign_up(new_context(), chat_server, alice)
    bob_page = sign_up(new_context(), chat_server, bob)

    # Strangers are not contacts: alice finds bob through the search.
    expect(contact(alice_page, bob)).to_have_count(0)
    expect(contact(bob_page, alice)).to_have_count(0)
    start_chat(alice_page, bob)
    send(alice_page, "Hi! Lunch at noon?")
    expect(bubble(alice_page, "Hi! Lunch at noon?").locator(".tick")).to_have_text("✓")

    # The first message makes them contacts, on both pages without a reload, online.
    expect_presence(alice_page, bob, "online")
    expect_presence(bob_page, alice, "online")

    # Not opened yet on bob's side: unread badge and title.
    expect(contact(bob_page, alice).locator(".badge")).to_contain_text("1")
    expect(bob_page).to_have_title("(1) ChatX")

    open_chat(bob_page, alice)
    expect(bubble(bob_page, "Hi! Lunch at noon?")).to_be_visible()
    expect(contact(bob_page, alice).locator(".badge")).to_be_hidden()
    expect(bob_page).to_have_title("ChatX")
    # bob has it on screen, so it is read: alice sees the second tick.
    expect(bubble(alice_page, "Hi! Lunch at noon?").locator(".tick")).to_have_text("✓✓")

    bob_box = bob_page.get_by_role("textbox", name="Message")
    bob_box.press_sequentially("Sure, see you there")
    expect(alice_page.get_by_text(f"{bob} is typing…")).to_be_visible()
    bob_page.get_by_role("button", name="Send").click()
    expect(bubble(alice_page, "Sure, see you there")).to_be_visible()
    expect(alice_page.get_by_text(f"{bob} is typing…")).to_be_hidden()
    expect(bubble(bob_page, "Sure, see you there").locator(".tick")).to_have_text("✓✓")
    expect(bubble(alice_page, "Sure, see you there")).to_have_class(re.compile(r"\btheirs\b"))
    expect(bubble(alice_page, "Hi! Lunch at noon?")).to_have_class(re.compile(r"\bmine\b"))

    send(alice_page, "Great 🙂\nI'll book a table.")
    expect(bubble(bob_page, "Great 🙂\nI'll book a table.")).to_be_visible()

    # A typing indicator with no message after it goes away by itself.
    alice_page.get_by_role("textbox", name="Message").press_sequentially("One more")
    expect(bob_page.get_by_text(f"{alice} is typing…")).to_be_visible()
    expect(bob_page.get_by_text(f"{alice} is typing…")).to_be_hidden(timeout=9000)



def test_closing_one_context_turns_the_other_side_offline(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    alice_context = new_context()
    alice_page = sign_up(alice_context, chat_server, alice)
    bob_page = sign_up(new_context(), chat_server, bob)
    start_chat(alice_page, bob)
    send(alice_page, "are you there?")
    expect_presence(bob_page, alice, "online")

    alice_context.close()
    expect_presence(bob_page, alice, "offline")
    expect(contact(bob_page, alice).get_by_role("button")).to_have_attribute("title", "last seen just now")
    open_chat(bob_page, alice)
    expect(bob_page.locator("#peer-status")).to_have_text("last seen just now")


def test_a_message_sent_across_a_server_restart_shows_reconnecting_and_arrives_exactly_once(
        tmp_path, new_context):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", **SIGNUPS}, tmp_path)
    server.start()
    try:
        alice, bob = unique("alice"), unique("bob")
        alice_context = new_context()
        sockets = []
        alice_context.on("page", lambda page: page.on("websocket", lambda ws: sockets.append(ws.url)))
        alice_page = sign_up(alice_context, server, alice)
        bob_page = sign_up(new_context(), server, bob)
        start_chat(alice_page, bob)
        send(alice_page, "before the restart")
        open_chat(bob_page, alice)
        expect(bubble(bob_page, "before the restart")).to_be_visible()

        expect_presence(alice_page, bob, "online")
        expect(alice_page.locator("#peer-status")).to_have_text("online")
        in_flight, while_down = "sent as the server stops", "typed while the server is down"
        send(alice_page, in_flight)
        server.stop()
        expect(alice_page.get_by_text("Reconnecting…")).to_be_visible()
        # Nobody's presence is known while the connection is down: not "online".
        expect(contact(alice_page, bob).get_by_text("presence unknown", exact=True)).to_have_count(1)
        expect(contact(alice_page, bob).get_by_text("online", exact=True)).to_have_count(0)
        expect(alice_page.locator("#peer-status")).to_have_text("waiting for the connection…")
        # The bar lies over the page: nothing under it moved down or got cut off.
        for region in (alice_page.locator(".sidebar"), alice_page.locator(".conversation")):
            box = region.bounding_box()
            assert box["y"] == 0 and box["height"] == 800, box
        send(alice_page, while_down)
        expect(bubble(alice_page, while_down)).to_have_attribute("data-state", "pending")

        server.start()
        expect(alice_page.get_by_text("Reconnecting…")).to_be_hidden(timeout=30_000)
        expect_presence(alice_page, bob, "online")
        for text in (in_flight, while_down):
            expect(bubble(bob_page, text)).to_have_count(1, timeout=30_000)
            expect(bubble(alice_page, text)).to_have_attribute("data-state", re.compile("sent|read"))
            expect(bubble(alice_page, text)).to_have_count(1)
        # A fresh page starts live; a reconnection resumes after the last event seen.
        ws_base = server.base.replace("http://", "ws://")
        assert sockets[0] == ws_base + "/ws"
        assert len(sockets) >= 2 and all(re.fullmatch(re.escape(ws_base) + r"/ws\?since=[1-9]\d*", url)
                                         for url in sockets[1:]), sockets

        # Stored once too: a fresh page loads the history from the server.
        bob_page.reload()
        expect(bubble(bob_page, "before the restart")).to_be_visible()
        for text in (in_flight, while_down):
            expect(bubble(bob_page, text)).to_have_count(1)
    finally:
        server.stop()


def test_markup_in_a_message_is_shown_as_text_and_runs_nothing(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    alice_page = sign_up(new_context(), chat_server, alice)
    bob_page = sign_up(new_context(), chat_server, bob)
    dialogs = []
    for page in (alice_page, bob_page):
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    start_chat(alice_page, bob)

    payload = "<img src=x onerror=alert(1)>"
    send(alice_page, payload)
    open_chat(bob_page, alice)
    send(alice_page, "javascript:alert(2) <b>bold?</b> https://example.com/a?b=1.")
    expect(bubble(bob_page, payload)).to_be_visible()
    expect(messages(bob_page).get_by_text("<b>bold?</b>", exact=False)).to_be_visible()
    for page in (alice_page, bob_page):
        expect(messages(page).locator("img, b")).to_have_count(0)
        links = messages(page).get_by_role("link")
        expect(links).to_have_count(1)
        expect(links).to_have_attribute("href", "https://example.com/a?b=1")

    # A round trip after it: anything the markup could have run has had its chance.
    send(bob_page, "got it")
    expect(bubble(alice_page, "got it")).to_be_visible()
    assert dialogs == []


def seed_conversation(server, sender, recipient, count):
    """Two scripted clients write `msg 001` … alternately, each waiting for its ack."""
    people = [remote_sign_up(server, sender), remote_sign_up(server, recipient)]
    with people[0].ws(server) as sender_ws, people[1].ws(server) as recipient_ws:
        for i in range(1, count + 1):
            ws, to = (sender_ws, recipient) if i % 2 else (recipient_ws, sender)
            ws.send(json.dumps({"type": "send", "to": to, "body": f"msg {i:03}", "client_id": f"seed-{i}"}))
            last = receive(ws, "ack")
            assert last["client_id"] == f"seed-{i}"
        # All read: the conversation opens at its newest message, not at the first unread one.
        recipient_ws.send(json.dumps({"type": "read", "with": sender, "up_to": last["message"]["id"]}))
        assert receive(recipient_ws, "read")["up_to"] == last["message"]["id"]


def test_scrolling_up_loads_older_history_in_order_without_jumping(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    seed_conversation(chat_server, bob, alice, 120)

    page = sign_in(new_context(), chat_server, alice)
    open_chat(page, bob)
    log = messages(page)
    bodies = log.locator(".msg .body")
    expect(bodies).to_have_count(50)
    expect(bodies.last).to_have_text("msg 120")
    expect(bodies.last).to_be_in_viewport()
    expect(log.get_by_text("msg 070", exact=True)).to_have_count(0)

    log.evaluate("log => { log.scrollTop = 0; }")
    expect(bodies).to_have_count(100)
    # The reader was looking at msg 071; older pages appear above it, off screen.
    expect(log.get_by_text("msg 071", exact=True)).to_be_in_viewport()
    expect(log.get_by_text("msg 021", exact=True)).not_to_be_in_viewport()

    log.evaluate("log => { log.scrollTop = 0; }")
    expect(bodies).to_have_count(120)
    expect(log.get_by_text(f"This is the beginning of your conversation with {bob}.")).to_be_visible()
    assert bodies.all_inner_texts() == [f"msg {i:03}" for i in range(1, 121)]
    expect(log.locator(".msg.mine")).to_have_count(60)


def test_a_phone_shows_one_pane_at_a_time_and_still_sends(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    bob_page = sign_up(new_context(), chat_server, bob)
    phone = new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                        device_scale_factor=2)
    alice_page = sign_up(phone, chat_server, alice)
    start_chat(bob_page, alice)
    send(bob_page, "Hi from my laptop")

    expect(contacts(alice_page)).to_be_visible()
    expect(messages(alice_page)).to_be_hidden()

    contact(alice_page, bob).get_by_role("button").click()
    expect(messages(alice_page)).to_be_visible()
    expect(contacts(alice_page)).to_be_hidden()
    alice_page.get_by_role("textbox", name="Message").fill("Sent from my phone")
    alice_page.get_by_role("button", name="Send").click()
    expect(bubble(bob_page, "Sent from my phone")).to_be_visible()
    send(bob_page, "Got it on my laptop")
    expect(bubble(alice_page, "Got it on my laptop")).to_be_visible()

    alice_page.get_by_role("button", name="Back to contacts").click()
    expect(contacts(alice_page)).to_be_visible()
    expect(messages(alice_page)).to_be_hidden()


def test_signing_out_in_one_tab_sends_the_other_tab_to_the_sign_in_page(chat_server, new_context):
    context = new_context()
    first_tab = sign_up(context, chat_server, unique("alice"))
    second_tab = context.new_page()
    second_tab.goto(chat_server.base + "/")
    expect(second_tab.get_by_text("Connecting…")).to_be_hidden()

    second_tab.get_by_role("button", name="Sign out").click()
    expect(second_tab).to_have_url(chat_server.base + "/login")
    # The first tab's socket is closed with 4401: it goes to the sign-in page too.
    expect(first_tab).to_have_url(chat_server.base + "/login")
    first_tab.goto(chat_server.base + "/")
    expect(first_tab).to_have_url(chat_server.base + "/login")


def remote_send(server, remote, to, body):
    """A scripted client sends one message and waits for its ack; returns it."""
    with remote.ws(server) as ws:
        ws.send(json.dumps({"type": "send", "to": to, "body": body, "client_id": uuid.uuid4().hex}))
        return receive(ws, "ack")["message"]


def test_contacts_put_the_latest_conversation_first_and_filter_by_name(chat_server, new_context):
    prefix = uuid.uuid4().hex[:6]
    carol, dave, erin, frank = (f"{prefix}_{name}" for name in ("carol", "dave", "erin", "frank"))
    carol_remote, dave_remote = remote_sign_up(chat_server, carol), remote_sign_up(chat_server, dave)
    frank_remote = remote_sign_up(chat_server, frank)
    remote_sign_up(chat_server, erin)
    remote_send(chat_server, carol_remote, erin, "first from carol")
    remote_send(chat_server, dave_remote, erin, "first from dave")

    # The list comes from the server newest first, with the unread counts;
    # frank has written nothing yet: he is no contact.
    page = sign_in(new_context(), chat_server, erin)
    list_items = contacts(page).get_by_role("listitem").filter(has_text=prefix)
    expect(list_items).to_have_text([re.compile(dave), re.compile(carol)])
    expect(contact(page, dave).locator(".badge")).to_contain_text("1")
    expect(page).to_have_title("(2) ChatX")

    # A new message moves its conversation to the top.
    remote_send(chat_server, carol_remote, erin, "and again from carol")
    expect(list_items).to_have_text([re.compile(carol), re.compile(dave)])
    expect(contact(page, carol).locator(".badge")).to_contain_text("2")
    expect(page).to_have_title("(3) ChatX")

    # A first message from someone new makes a new contact, at the top.
    remote_send(chat_server, frank_remote, erin, "hello from frank")
    expect(list_items).to_have_text([re.compile(frank), re.compile(carol), re.compile(dave)])
    expect(page).to_have_title("(4) ChatX")

    # The search box narrows the contacts down and finds people in the directory.
    page.get_by_role("searchbox", name="Search people").fill(f"{prefix}_DAV")
    expect(list_items.filter(visible=True)).to_have_text([re.compile(dave)])
    expect(people(page).get_by_role("listitem")).to_have_text([re.compile(dave)])
    page.get_by_role("searchbox", name="Search people").fill("nobody-has-this-name")
    expect(page.get_by_text("No one matches")).to_be_visible()
    expect(list_items.filter(visible=True)).to_have_count(0)
    page.get_by_role("searchbox", name="Search people").press("Escape")
    expect(list_items.filter(visible=True)).to_have_count(3)
    expect(people(page)).to_be_hidden()


def insert_users(db_path, usernames):
    """Accounts written straight into the SQLite file: thousands in a moment."""
    now = int(time.time() * 1000)
    rows = [{"username": name, "username_key": name.lower(), "skeleton": chatx.skeleton(name.lower()),
             "password_hash": "not a password hash", "status": "offline", "last_seen": None,
             "created_at": now, "seq": 0} for name in usernames]
    with closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        columns = [column for column in rows[0]
                   if column in {row[1] for row in db.execute("PRAGMA table_info(chatx_users)")}]
        db.executemany(f"INSERT INTO chatx_users ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                       [tuple(row[column] for column in columns) for row in rows])


def test_a_page_load_among_2000_people_makes_one_list_request_and_opens_one_socket(tmp_path, new_context):
    db_path = tmp_path / "chat.db"
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{db_path}", **SIGNUPS}, tmp_path)
    server.start()
    try:
        insert_users(db_path, [f"crowd_{i:04}" for i in range(2000)])
        remote_sign_up(server, "alice")
        remote_send(server, remote_sign_up(server, "bob"), "alice", "hi alice")

        requests, sockets = [], []
        context = new_context()
        context.on("request", lambda request: requests.append(urlsplit(request.url)))
        context.on("page", lambda page: page.on("websocket", lambda ws: sockets.append(ws.url)))
        page = sign_in(context, server, "alice")
        expect(contact(page, "bob")).to_have_count(1)
        seen = list(requests)
        assert [url.path for url in seen].count("/api/conversations") == 1
        assert [url for url in seen if url.path == "/api/users"] == []
        assert [url for url in seen if url.path.endswith("/messages")] == []
        expect(page.get_by_text("Connecting…")).to_be_hidden()
        # Only the conversation is listed, none of the 2,000 strangers.
        expect(contacts(page).get_by_role("listitem")).to_have_count(1)
        expect(contact(page, "bob").locator(".badge")).to_contain_text("1")
        assert sockets == [server.base.replace("http://", "ws://") + "/ws"]

        # The directory is searched a page at a time.
        page.get_by_role("searchbox", name="Search people").fill("CROWD_1")
        found = people(page).get_by_role("listitem")
        expect(found).to_have_count(20)
        expect(found.first).to_contain_text("crowd_1000")
        page.get_by_role("button", name="More people").click()
        expect(found).to_have_count(40)
        expect(found.last).to_contain_text("crowd_1039")
        find_person(page, "crowd_1999")
        assert len(sockets) == 1
    finally:
        server.stop()


def test_the_contact_list_loads_older_conversations_when_scrolled_to_its_end(chat_server, new_context):
    prefix = uuid.uuid4().hex[:6]
    peers = [f"{prefix}_p{i:02}" for i in range(60)]
    insert_users(chat_server.workdir / "chat.db", peers)
    alice = remote_sign_up(chat_server, f"{prefix}_alice")
    with alice.ws(chat_server) as ws:
        for i, peer in enumerate(peers):
            ws.send(json.dumps({"type": "send", "to": peer, "body": f"hello {i}", "client_id": f"p-{i}"}))
            receive(ws, "ack")

    requests = []
    context = new_context()
    context.on("request", lambda request: requests.append(urlsplit(request.url)))
    page = sign_in(context, chat_server, alice.username)
    items = contacts(page).get_by_role("listitem")
    expect(items).to_have_count(50)
    expect(items.first).to_contain_text(peers[-1])
    expect(items.last).to_contain_text(peers[10])

    items.last.scroll_into_view_if_needed()
    expect(items).to_have_count(60)
    expect(items.last).to_contain_text(peers[0])
    pages = [url.query for url in requests if url.path == "/api/conversations"]
    assert len(pages) == 2 and "before=" in pages[1], pages


def test_the_search_finds_a_stranger_and_a_message_to_them_arrives(chat_server, new_context):
    prefix = uuid.uuid4().hex[:6]
    alice, bob = f"{prefix}_alice", f"{prefix}_bob"
    bob_remote = remote_sign_up(chat_server, bob)
    page = sign_up(new_context(), chat_server, alice)
    expect(contact(page, bob)).to_have_count(0)

    with bob_remote.ws(chat_server) as ws:
        receive(ws, "hello")
        # Any case, any prefix of the name.
        find_person(page, bob, query=f"{prefix}_B").get_by_role("button").click()
        expect(page.get_by_role("heading", name=bob)).to_be_visible()
        expect(messages(page).get_by_text(f"No messages yet. Say hello to {bob}!")).to_be_visible()
        expect(people(page)).to_be_hidden()

        send(page, "hello, stranger")
        frame = receive(ws, "message")
        assert frame["message"]["body"] == "hello, stranger"
        assert frame["message"]["from"] == alice
        assert isinstance(frame["seq"], int)
        # Now they have a conversation: bob is a contact, and his answer shows up.
        expect(contact(page, bob)).to_have_count(1)
        ws.send(json.dumps({"type": "send", "to": alice, "body": "hi back", "client_id": "b-1"}))
        expect(bubble(page, "hi back")).to_be_visible()
        expect_presence(page, bob, "online")
    expect_presence(page, bob, "offline")


def test_an_edit_and_a_delete_by_the_other_person_show_up_live_and_after_a_reload(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    bob_remote = remote_sign_up(chat_server, bob)
    page = sign_up(new_context(), chat_server, alice)

    with bob_remote.ws(chat_server) as ws:
        def say(body):
            ws.send(json.dumps({"type": "send", "to": alice, "body": body, "client_id": uuid.uuid4().hex}))
            return receive(ws, "ack")["message"]

        first, second = say("see you at 5"), say("bring the slides")
        open_chat(page, bob)
        expect(bubble(page, "see you at 5")).to_be_visible()
        expect(bubble(page, "bring the slides")).to_be_visible()
        expect(messages(page).get_by_text("edited", exact=True).filter(visible=True)).to_have_count(0)

        ws.send(json.dumps({"type": "edit", "id": first["id"], "body": "see you at 6"}))
        assert receive(ws, "edit")["message"]["edited_at"]
        expect(bubble(page, "see you at 6").get_by_text("edited", exact=True)).to_be_visible()
        expect(bubble(page, "see you at 5")).to_have_count(0)

        ws.send(json.dumps({"type": "delete", "id": second["id"]}))
        assert receive(ws, "delete")["message"]["deleted"] is True
        expect(bubble(page, "message deleted")).to_have_count(1)
        expect(messages(page).get_by_text("bring the slides")).to_have_count(0)
        expect(messages(page).locator(".msg")).to_have_count(2)

    # The history over HTTP shows the same.
    page.reload()
    expect(page.get_by_role("heading", name=bob)).to_be_visible()
    expect(bubble(page, "see you at 6").get_by_text("edited", exact=True)).to_be_visible()
    expect(bubble(page, "message deleted")).to_have_count(1)
    expect(messages(page).get_by_text("bring the slides")).to_have_count(0)


def test_a_link_opens_a_conversation_with_anyone_and_a_malformed_one_is_ignored(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    remote_sign_up(chat_server, bob)
    context = new_context()
    sign_up(context, chat_server, alice)

    broken = context.new_page()
    broken.goto(chat_server.base + "/#%E0%A4%A")
    expect(broken.get_by_text("Connecting…")).to_be_hidden()
    expect(broken.get_by_text("Choose someone on the left to start chatting.")).to_be_visible()
    expect(messages(broken)).to_be_hidden()

    linked = context.new_page()
    linked.goto(chat_server.base + "/#" + bob.upper())
    expect(linked.get_by_role("heading", name=bob)).to_be_visible()
    expect(messages(linked).get_by_text(f"No messages yet. Say hello to {bob}!")).to_be_visible()
    # Not a contact until a message is exchanged.
    expect(contact(linked, bob)).to_have_count(0)
    send(linked, "found you by a link")
    expect(contact(linked, bob)).to_have_count(1)
    # The page errors of all three pages are checked by new_context.


HOST_APP = """
from contextlib import asynccontextmanager
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
import chatx

chat = chatx.create_app()

@asynccontextmanager
async def lifespan(app):
    async with chat.router.lifespan_context(chat):
        yield

app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("host")), Mount("/chat", app=chat)],
                lifespan=lifespan)
"""


@pytest.fixture
def mounted_server(tmp_path):
    """ChatX mounted at /chat inside a host Starlette app, as the README shows."""
    (tmp_path / "host.py").write_text(HOST_APP)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
           "CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}
    with open(tmp_path / "host.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "host:app", "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/chat"

    def healthy():
        assert process.poll() is None, (tmp_path / "host.log").read_text()[-3000:]
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=20, what="the host app")
    yield base
    process.terminate()
    process.wait(timeout=20)


def test_the_client_honours_the_mount_prefix_for_links_static_files_api_and_socket(mounted_server, new_context):
    class Mounted:
        base = mounted_server

    alice, bob = unique("alice"), unique("bob")
    requests, sockets = [], []
    context = new_context()
    context.on("request", lambda request: requests.append(request.url))
    context.on("page", lambda page: page.on("websocket", lambda ws: sockets.append(ws.url)))
    alice_page = sign_up(context, Mounted, alice)
    bob_page = sign_up(new_context(), Mounted, bob)
    start_chat(alice_page, bob)  # the directory search goes through /chat/api/users
    send(alice_page, "hello under /chat")
    expect_presence(alice_page, bob, "online")
    open_chat(bob_page, alice)
    expect(bubble(bob_page, "hello under /chat")).to_be_visible()

    host = mounted_server.removesuffix("/chat")
    ws_base = mounted_server.replace("http://", "ws://")
    assert sockets and sockets[0] == ws_base + "/ws"
    assert all(url.startswith(ws_base + "/ws") for url in sockets)
    assert any(url.startswith(mounted_server + "/api/users?") for url in requests)
    assert any(url.startswith(mounted_server + "/api/conversations") for url in requests)
    assert [url for url in requests if url.startswith(host) and not url.startswith(mounted_server)] == []

    alice_page.get_by_role("button", name="Sign out").click()
    expect(alice_page).to_have_url(mounted_server + "/login")
    alice_page.get_by_role("link", name="Create account").click()
    expect(alice_page).to_have_url(mounted_server + "/register")


def visible_times(page, *texts):
    return [bubble(page, text).locator("time").evaluate("t => !t.classList.contains('visually-hidden')")
            for text in texts]


def test_groups_share_one_time_unread_messages_get_a_divider_and_the_list_shows_the_last_message(
        chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    bob_remote = remote_sign_up(chat_server, bob)
    page = sign_up(new_context(), chat_server, alice)
    remote_send(chat_server, bob_remote, alice, "first")

    # The list shows the last message and its time.
    expect(contact(page, bob).locator(".preview")).to_have_text("first")
    expect(contact(page, bob).locator("time")).to_have_text(re.compile(r"\d"))
    open_chat(page, bob)
    expect(bubble(page, "first")).to_be_visible()
    expect(contact(page, bob).locator(".badge")).to_be_hidden()
    expect(messages(page).locator(".msg .body, .unread-divider")).to_have_text(["Unread messages", "first"])

    # Escape closes the conversation on a desktop.
    page.get_by_role("textbox", name="Message").press("Escape")
    expect(messages(page)).to_be_hidden()
    expect(page).to_have_url(chat_server.base + "/")

    with bob_remote.ws(chat_server) as ws:
        for body in ("second", "third", "fourth"):
            ws.send(json.dumps({"type": "send", "to": alice, "body": body, "client_id": uuid.uuid4().hex}))
            receive(ws, "ack")
    expect(contact(page, bob).locator(".badge")).to_contain_text("3")
    expect(contact(page, bob).locator(".preview")).to_have_text("fourth")

    # Opened again: at the first unread message, under the divider; the three
    # form one group with one time shown, under its last message.
    open_chat(page, bob)
    log = messages(page)
    expect(log.locator(".unread-divider")).to_have_text("Unread messages")
    expect(log.locator(".msg .body, .unread-divider")).to_have_text(
        ["first", "Unread messages", "second", "third", "fourth"])
    assert visible_times(page, "first", "second", "third", "fourth") == [True, False, False, True]
    expect(bubble(page, "third")).to_have_class(re.compile(r"\bcontinues\b"))
    expect(log.get_by_role("separator").filter(has_text="Today")).to_have_count(1)

    send(page, "all four received")
    expect(contact(page, bob).locator(".preview")).to_have_text("You: all four received")
    expect(log.locator(".unread-divider")).to_have_count(0)

    # The counter counts characters as people see them.
    box = page.get_by_role("textbox", name="Message")
    counter = page.locator("#counter")
    box.fill("👨‍👩‍👧‍👦" + "a" * 3500)
    expect(counter).to_have_text("499 characters left")
    box.fill("a" * 4001)
    expect(counter).to_have_text("1 character over the 4000 limit")
    expect(page.get_by_role("button", name="Send")).to_be_disabled()


def test_edit_delete_and_reply_are_seen_live_by_the_other_person_and_after_a_reload(chat_server, new_context):
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "meet at 5", "bring snacks")
    expect(bubble(bob_page, "bring snacks")).to_be_visible()

    # ↑ in the empty box edits my last message.
    box = alice_page.get_by_role("textbox", name="Message")
    box.press("ArrowUp")
    expect(alice_page.get_by_text("Edit message")).to_be_visible()
    expect(box).to_have_value("bring snacks")
    box.fill("bring drinks")
    box.press("Enter")
    expect(bubble(bob_page, "bring drinks").get_by_text("edited", exact=True)).to_be_visible()
    expect(bubble(alice_page, "bring drinks").get_by_text("edited", exact=True)).to_be_visible()
    expect(box).to_have_value("")

    # Delete from the message's menu, after a confirmation.
    menu = open_menu(alice_page, "meet at 5")
    expect(menu.get_by_role("menuitem")).to_have_text(["Reply", "Copy", "Edit", "Delete"])
    menu.get_by_role("menuitem", name="Delete").click()
    alice_page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(bubble(bob_page, "message deleted")).to_have_count(1)
    expect(bob_page.get_by_text("meet at 5")).to_have_count(0)
    expect(bubble(alice_page, "message deleted")).to_have_count(1)

    # bob replies to a message: the quote is above the reply, on both sides.
    menu = open_menu(bob_page, "bring drinks")
    expect(menu.get_by_role("menuitem")).to_have_text(["Reply", "Copy"])
    menu.get_by_role("menuitem", name="Reply").click()
    expect(bob_page.get_by_text(f"Reply to {alice}")).to_be_visible()
    send(bob_page, "on it!")
    for page, who in ((bob_page, alice), (alice_page, "You")):
        quote = bubble(page, "on it!").locator(".quote")
        expect(quote).to_contain_text(who)
        expect(quote).to_contain_text("bring drinks")
    # The reply went with reply_to: the original's id, as the server keeps it.
    original_id = int(bubble(alice_page, "bring drinks").get_attribute("data-id"))
    history = alice_page.evaluate("url => fetch(url).then((r) => r.json())",
                                  f"/api/conversations/{bob}/messages")["messages"]
    assert [(m["body"], m["reply_to"]) for m in history if m["body"] == "on it!"] == [("on it!", original_id)]

    check_accessibility(alice_page, "a conversation with an edit, a delete and a reply")

    # After a reload, each sees the same: edited, deleted, the quote, and a
    # click on the quote brings the original into view.
    for page, who in ((alice_page, "You"), (bob_page, alice)):
        page.reload()
        expect(bubble(page, "bring drinks").get_by_text("edited", exact=True)).to_be_visible()
        expect(bubble(page, "message deleted")).to_have_count(1)
        expect(page.get_by_text("meet at 5")).to_have_count(0)
        quote = bubble(page, "on it!").locator(".quote")
        expect(quote).to_contain_text("bring drinks")
        quote.click()
        expect(bubble(page, "bring drinks")).to_be_focused()
        expect(bubble(page, "bring drinks")).to_be_in_viewport()


def block(page, username):
    """Block from the conversation's header, confirming in the dialog that asks."""
    page.get_by_role("button", name=f"Block {username}").click()
    page.get_by_role("dialog", name=f"Block {username}?").get_by_role("button", name="Block").click()
    expect(page.get_by_text(f"You blocked {username}.")).to_be_visible()


def test_a_block_asks_first_shows_a_banner_and_is_seen_from_both_sides_and_an_unblock_lifts_it(
        chat_server, new_context):
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "hello bob")
    expect(bubble(bob_page, "hello bob")).to_be_visible()

    # The block asks first, saying what it does; Cancel leaves things as they were.
    bob_page.get_by_role("button", name=f"Block {alice}").click()
    dialog = bob_page.get_by_role("dialog", name=f"Block {alice}?")
    expect(dialog).to_have_accessible_description(
        "They won't be able to message you or see when you're online.")
    for scheme in ("light", "dark"):
        bob_page.emulate_media(color_scheme=scheme)
        check_accessibility(bob_page, f"the block confirmation, {scheme}")
    bob_page.emulate_media(color_scheme="light")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(bob_page.get_by_role("button", name=f"Block {alice}")).to_be_focused()
    expect(bob_page.get_by_role("textbox", name="Message")).to_be_visible()
    assert bob_page.evaluate("() => fetch('/api/blocks').then((r) => r.json())") == {"blocks": []}

    block(bob_page, alice)
    banner = bob_page.locator("#block-notice")
    expect(banner).to_have_class(re.compile(r"\bbanner\b"))
    expect(banner.get_by_role("button", name=f"Unblock {alice}")).to_be_visible()
    expect(bob_page.get_by_role("textbox", name="Message")).to_be_hidden()
    expect(bob_page.locator("#peer-status")).to_have_text("blocked")
    check_accessibility(bob_page, "a blocked conversation")

    send(alice_page, "are you there?")
    expect(bubble(alice_page, "are you there?")).to_have_attribute("data-state", "failed")
    expect(alice_page.get_by_text(f"{bob} isn't accepting messages from you.")).to_be_visible()
    expect(bubble(bob_page, "are you there?")).to_have_count(0)

    # A reload keeps the block (it comes from the server).
    bob_page.reload()
    expect(bob_page.get_by_text(f"You blocked {alice}.")).to_be_visible()
    banner.get_by_role("button", name=f"Unblock {alice}").click()
    expect(bob_page.get_by_text(f"You blocked {alice}.")).to_be_hidden()
    expect(bob_page.get_by_role("textbox", name="Message")).to_be_visible()
    expect(bob_page.get_by_role("button", name=f"Block {alice}")).to_be_visible()

    send(alice_page, "and now?")
    expect(bubble(bob_page, "and now?")).to_be_visible()
    expect(alice_page.get_by_text(f"{bob} isn't accepting messages from you.")).to_be_hidden()


def test_a_block_shows_each_side_the_other_offline_at_once_and_an_unblock_shows_them_online_again(
        chat_server, new_context):
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "hello bob")
    expect(bubble(bob_page, "hello bob")).to_be_visible()
    expect_presence(alice_page, bob, "online")
    expect_presence(bob_page, alice, "online")
    expect(alice_page.locator("#peer-status")).to_have_text("online")

    block(bob_page, alice)
    # Both pages, without a reload, while both people are still online.
    expect_presence(alice_page, bob, "offline")
    expect(alice_page.locator("#peer-status")).to_have_text("offline")  # no last seen either
    expect_presence(bob_page, alice, "offline")

    bob_page.get_by_role("button", name=f"Unblock {alice}").first.click()
    expect_presence(alice_page, bob, "online")
    expect(alice_page.locator("#peer-status")).to_have_text("online")
    expect_presence(bob_page, alice, "online")
    expect(bob_page.locator("#peer-status")).to_have_text("online")


BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def test_right_to_left_text_takes_its_direction_from_its_content_and_links_hold_no_bidi_controls(
        chat_server, new_context):
    hebrew = "שלום, מה שלומך?"
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "hello first", hebrew)

    for page in (alice_page, bob_page):
        body = bubble(page, hebrew).locator(".body")
        expect(body).to_have_attribute("dir", "auto")
        geometry = body.evaluate("""body => {
            const text = body.firstChild, range = document.createRange(), at = (i) => {
                range.setStart(text, i); range.setEnd(text, i + 1); return range.getBoundingClientRect();
            };
            const style = getComputedStyle(body);
            return { direction: style.direction, bidi: style.unicodeBidi, first: at(0), last: at(text.length - 1),
                     box: body.getBoundingClientRect() };
        }""")
        assert geometry["direction"] == "rtl" and geometry["bidi"] == "isolate", geometry
        # Read from the right: the first letter is at the right edge, the question mark at the left end.
        assert geometry["last"]["right"] <= geometry["first"]["left"], geometry
        assert abs(geometry["first"]["right"] - geometry["box"]["right"]) < 2, geometry
        assert abs(geometry["last"]["left"] - geometry["box"]["left"]) < 2, geometry
        latin = bubble(page, "hello first").locator(".body")
        assert latin.evaluate("b => getComputedStyle(b).direction") == "ltr"
    preview = contact(bob_page, alice).locator(".preview-text")
    expect(preview).to_have_text(hebrew)
    assert preview.evaluate("p => [getComputedStyle(p).direction, getComputedStyle(p).unicodeBidi]") == [
        "rtl", "isolate"]

    # A right-to-left override inside an address ends the link: no link holds one.
    send(alice_page, "see https://example.com/\u202egpj.exe and https://example.org/\u2067x\u2069 too")
    expect(messages(bob_page).get_by_role("link")).to_have_count(2)
    for page in (alice_page, bob_page):
        links = messages(page).get_by_role("link").evaluate_all("links => links.map(a => [a.href, a.textContent])")
        assert [href for href, _ in links] == ["https://example.com/", "https://example.org/"], links
        assert not any(BIDI_CONTROLS.search(href + text) for href, text in links), links


def test_a_deep_link_survives_signing_in_through_a_safe_next(chat_server, new_context):
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    remote_sign_up(chat_server, alice)
    remote_sign_up(chat_server, bob)

    page = new_context().new_page()
    page.goto(f"{chat_server.base}/#{bob}")
    expect(page).to_have_url(f"{chat_server.base}/login?next=%2F%23{bob}")
    page.get_by_label("Username").fill(alice)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{chat_server.base}/#{bob}")
    expect(page.get_by_role("heading", name=bob)).to_be_visible()
    expect(messages(page)).to_be_visible()

    # Through the sign-up page too: the link to it keeps the next.
    page = new_context().new_page()
    page.goto(f"{chat_server.base}/#{bob}")
    page.get_by_role("link", name="Create account").click()
    expect(page).to_have_url(f"{chat_server.base}/register?next=%2F%23{bob}")
    page.get_by_label("Username").fill(carol)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("heading", name=bob)).to_be_visible()
    expect(page).to_have_url(f"{chat_server.base}/#{bob}")

    # A next that leaves the chat page, or the site, is not followed.
    for unsafe in ("//example.com/%23x", "https://example.com/", "/api/me", "javascript:alert(1)", "/\\example.com"):
        page = new_context().new_page()
        page.goto(f"{chat_server.base}/login?next={unsafe}")
        page.get_by_label("Username").fill(alice)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(chat_server.base + "/")
        page.context.close()


def test_the_search_is_used_with_the_keyboard_alone(chat_server, new_context):
    prefix = uuid.uuid4().hex[:6]
    names = [f"{prefix}_{name}" for name in ("anna", "anton", "antje")]
    for name in names:
        remote_sign_up(chat_server, name)
    page = sign_up(new_context(), chat_server, f"{prefix}_zed")
    page.get_by_role("button", name="New chat").click()
    search = page.get_by_role("searchbox", name="Search people")
    expect(search).to_be_focused()
    search.press_sequentially(f"{prefix}_an")
    found = people(page).get_by_role("button")
    expect(found).to_have_count(3)
    search.press("ArrowDown")
    expect(found.nth(0)).to_be_focused()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    expect(found.nth(2)).to_be_focused()
    page.keyboard.press("ArrowUp")
    expect(found.nth(1)).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=sorted(names)[1])).to_be_visible()
    expect(page.get_by_role("textbox", name="Message")).to_be_focused()


def test_every_page_and_state_has_no_serious_accessibility_violation(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    context = new_context(reduced_motion="reduce")
    page = context.new_page()
    page.goto(chat_server.base + "/login")
    check_accessibility(page, "sign-in")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Enter your username.")).to_be_visible()
    check_accessibility(page, "sign-in with an error")
    page.goto(chat_server.base + "/register")
    check_accessibility(page, "register")
    page.close()

    bob_page = sign_up(new_context(reduced_motion="reduce"), chat_server, bob)
    page = sign_up(context, chat_server, alice)
    check_accessibility(page, "empty chat")
    find_person(page, bob)
    check_accessibility(page, "the search")
    page.get_by_role("searchbox", name="Search people").press("Escape")
    start_chat(page, bob)
    check_accessibility(page, "a new conversation")
    send(page, "Hi Bob, are we still on for Friday?")
    send(page, "https://example.com/menu")
    open_chat(bob_page, alice)
    send(bob_page, "Yes! Friday at 8.")
    expect(bubble(page, "Yes! Friday at 8.")).to_be_visible()
    check_accessibility(page, "a conversation")
    open_menu(page, "https://example.com/menu")
    check_accessibility(page, "a message menu")
    page.get_by_role("menuitem", name="Delete").click()
    check_accessibility(page, "the delete dialog")
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    page.emulate_media(color_scheme="dark")
    check_accessibility(page, "a conversation, dark")

    for scheme in ("light", "dark"):
        phone = new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                            color_scheme=scheme, reduced_motion="reduce")
        phone_page = sign_in(phone, chat_server, bob)
        expect(contact(phone_page, alice)).to_be_visible()
        check_accessibility(phone_page, f"phone contacts, {scheme}")
        open_chat(phone_page, alice)
        expect(bubble(phone_page, "Yes! Friday at 8.")).to_be_visible()
        check_accessibility(phone_page, f"phone conversation, {scheme}")
        phone.close()


# ---- round 3: account, failed sends, times, long press, theme ----------------------


def open_account(page):
    page.get_by_role("button", name="Account").click()
    dialog = page.get_by_role("dialog", name="Account")
    expect(dialog).to_be_visible()
    return dialog


def sign_in_with(page, server, username, password):
    page.goto(server.base + "/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(server.base + "/")
    expect(page.get_by_text("Connecting…")).to_be_hidden()


def test_the_account_dialog_changes_the_password_signs_out_everywhere_and_deletes_the_account(
        chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    page = sign_up(new_context(reduced_motion="reduce"), chat_server, alice)  # no colour mid-transition for axe
    other_page = sign_in(new_context(), chat_server, alice)
    expect(other_page.get_by_text("Connecting…")).to_be_hidden()
    bob_page = sign_up(new_context(), chat_server, bob)
    start_chat(page, bob)
    send(page, "before I go")
    expect(contact(bob_page, alice)).to_be_visible()

    dialog = open_account(page)
    for theme in ("Light", "Dark"):
        dialog.get_by_role("radio", name=theme).check()
        check_accessibility(page, f"the account dialog, {theme.lower()}")
    dialog.get_by_role("radio", name="System").check()

    # A wrong current password is said next to it; the right one changes it
    # and ends every other session: the other tab goes to the sign-in page.
    new_password = "a brand new passphrase"
    dialog.get_by_label("Current password").fill("not my password")
    dialog.get_by_label("New password").fill(new_password)
    dialog.get_by_role("button", name="Change password").click()
    expect(dialog.get_by_text("That isn't your current password.")).to_be_visible()
    expect(dialog.get_by_label("Current password")).to_have_attribute("aria-invalid", "true")
    dialog.get_by_label("Current password").fill(PASSWORD)
    dialog.get_by_role("button", name="Change password").click()
    expect(dialog.get_by_text("Password changed.")).to_be_visible()
    expect(other_page).to_have_url(re.compile(r"/login"))
    expect(page).to_have_url(f"{chat_server.base}/#{bob}")
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("button", name="Account")).to_be_focused()

    # Sign out everywhere: this tab and the other, whose socket closes.
    sign_in_with(other_page, chat_server, alice, new_password)
    expect(other_page.locator("#app")).not_to_have_class(re.compile("disconnected"))
    open_account(page).get_by_role("button", name="Sign out everywhere").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    expect(other_page).to_have_url(re.compile(r"/login"))
    assert other_page.evaluate("() => fetch('/api/me').then((r) => r.status)") == 401

    # Delete: a confirmation names what goes and asks for the password.
    sign_in_with(page, chat_server, alice, new_password)
    open_account(page).get_by_role("button", name="Delete account").click()
    confirm = page.get_by_role("dialog", name="Delete your account?")
    expect(confirm).to_contain_text(alice)
    expect(confirm).to_contain_text("every message you sent or received")
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        check_accessibility(page, f"the account deletion confirmation, {scheme}")
    confirm.get_by_label("Password").fill(PASSWORD)  # the old one
    confirm.get_by_role("button", name="Delete account").click()
    expect(confirm.get_by_text("That isn't your password.")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/$"))
    confirm.get_by_label("Password").fill(new_password)
    confirm.get_by_role("button", name="Delete account").click()
    expect(page).to_have_url(re.compile(r"/register$"))

    # Gone from bob's list and from the directory; the name is free again.
    bob_page.reload()
    expect(contacts(bob_page)).to_be_attached()
    expect(bob_page.get_by_text("Loading your conversations…")).to_be_hidden()
    expect(contact(bob_page, alice)).to_have_count(0)
    page.get_by_label("Username").fill(alice)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(chat_server.base + "/")
    expect(contacts(page).get_by_role("listitem")).to_have_count(0)


def test_a_failed_send_keeps_its_place_in_time_and_a_retry_sends_it(chat_server, new_context):
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "hello bob")
    expect(bubble(bob_page, "hello bob")).to_be_visible()
    block(bob_page, alice)

    send(alice_page, "are you there?")
    failed = bubble(alice_page, "are you there?")
    expect(failed).to_have_attribute("data-state", "failed")
    expect(failed.get_by_role("button", name="Retry")).to_be_visible()
    expect(failed.get_by_role("button", name="Discard")).to_be_visible()

    # Unblocked, bob writes: his later message goes below the failed one.
    bob_page.locator("#block-notice").get_by_role("button", name=f"Unblock {alice}").click()
    send(bob_page, "sorry, back now")
    expect(bubble(alice_page, "sorry, back now")).to_be_visible()
    log = messages(alice_page)
    expect(log.locator(".msg .body")).to_have_text(["hello bob", "are you there?", "sorry, back now"])
    expect(failed).to_have_attribute("data-state", "failed")

    # Retried, it is sent now: delivered once, at the bottom of both logs.
    failed.get_by_role("button", name="Retry").click()
    expect(bubble(bob_page, "are you there?")).to_have_count(1)
    expect(messages(bob_page).locator(".msg .body")).to_have_text(
        ["hello bob", "sorry, back now", "are you there?"])
    expect(log.locator(".msg .body")).to_have_text(["hello bob", "sorry, back now", "are you there?"])
    expect(bubble(alice_page, "are you there?").locator(".tick")).to_have_text(re.compile("✓"))

    # Discard drops a failed one for good, reload or not.
    block(bob_page, alice)
    send(alice_page, "never mind")
    expect(bubble(alice_page, "never mind")).to_have_attribute("data-state", "failed")
    bubble(alice_page, "never mind").get_by_role("button", name="Discard").click()
    expect(bubble(alice_page, "never mind")).to_have_count(0)
    alice_page.reload()
    expect(bubble(alice_page, "are you there?")).to_be_visible()
    expect(bubble(alice_page, "never mind")).to_have_count(0)


def set_sent_at(server, when: dict) -> None:
    """Moves messages (by body) to other times, straight in the SQLite file."""
    path = server.env["CHATX_DATABASE_URL"].removeprefix("sqlite:///")
    with closing(sqlite3.connect(path, timeout=30)) as db, db:
        for body, at in when.items():
            changed = db.execute("UPDATE chatx_messages SET sent_at = ? WHERE body = ?",
                                 (int(at.timestamp() * 1000), body)).rowcount
            assert changed == 1, body


def spaced(text: str) -> str:
    return re.sub(r"[\u202f\u00a0]", " ", text)


def test_times_read_in_the_locale_s_own_way_with_today_yesterday_weekdays_and_dates(chat_server, new_context):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    now = datetime(2026, 3, 12, 15, 30, tzinfo=berlin)  # a Thursday
    tag = uuid.uuid4().hex[:6]
    me = f"reader_{tag}"
    remote_sign_up(chat_server, me)
    # One conversation per day to show in the list, and one over three days.
    when = {
        f"today {tag}": datetime(2026, 3, 12, 9, 5, tzinfo=berlin),
        f"yesterday {tag}": datetime(2026, 3, 11, 21, 40, tzinfo=berlin),
        f"monday {tag}": datetime(2026, 3, 9, 10, 0, tzinfo=berlin),
        f"january {tag}": datetime(2026, 1, 20, 8, 0, tzinfo=berlin),
        f"last year {tag}": datetime(2025, 12, 24, 12, 0, tzinfo=berlin),
    }
    senders = {}
    for body in when:
        sender = f"s{len(senders)}_{tag}"
        remote = remote_sign_up(chat_server, sender)
        remote_send(chat_server, remote, me, body)
        senders[body] = sender
    days = {f"days 1 {tag}": datetime(2026, 3, 9, 18, 0, tzinfo=berlin),
            f"days 2 {tag}": datetime(2026, 3, 11, 8, 0, tzinfo=berlin),
            f"days 3 {tag}": datetime(2026, 3, 12, 14, 7, tzinfo=berlin)}
    remote = remote_sign_up(chat_server, f"days_{tag}")
    for body in days:
        remote_send(chat_server, remote, me, body)
    set_sent_at(chat_server, {**when, **days})

    expected = {
        "en-US": {"list": ["2:07 PM", "9:05 AM", "Yesterday", "Mon", "Jan 20", "12/24/25"],
                  "days": ["Monday", "Yesterday", "Today"], "bubble": "2:07 PM"},
        "de-DE": {"list": ["14:07", "9:05", "Gestern", "Mo", "20. Jan.", "24.12.25"],
                  "days": ["Montag", "Gestern", "Heute"], "bubble": "14:07"},
    }
    for locale, want in expected.items():
        context = new_context(locale=locale, timezone_id="Europe/Berlin")
        context.clock.set_fixed_time(now)
        page = context.new_page()
        sign_in_with(page, chat_server, me, PASSWORD)
        names = [f"days_{tag}", *senders.values()]
        for name in names:
            expect(contact(page, name)).to_be_visible()
        times = [spaced(contact(page, name).locator("time").inner_text()) for name in names]
        assert times == want["list"], (locale, times)
        open_chat(page, f"days_{tag}")
        expect(messages(page).get_by_role("separator").filter(has_not_text="Unread")).to_have_text(want["days"])
        assert spaced(bubble(page, f"days 3 {tag}").locator("time").inner_text()) == want["bubble"]


def test_a_long_press_opens_the_message_menu_on_a_touch_screen_and_keyboard_and_right_click_reach_it(
        chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    alice_page = sign_up(new_context(permissions=["clipboard-read", "clipboard-write"]), chat_server, alice)
    phone = new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    bob_page = sign_up(phone, chat_server, bob)
    start_chat(alice_page, bob)
    send(alice_page, "hold me down")
    open_chat(bob_page, alice)
    target = bubble(bob_page, "hold me down")
    expect(target).to_be_visible()

    # No "⋯" beside every bubble on a phone.
    actions = target.locator(".msg-actions")
    assert actions.evaluate("b => { const r = b.getBoundingClientRect(); return r.width <= 1 && r.height <= 1; }")
    menu = bob_page.get_by_role("menu")
    expect(menu).to_be_hidden()

    # A touch held still on the message opens its menu.
    box = target.bounding_box()
    touch = phone.new_cdp_session(bob_page)
    point = {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2}
    touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [point]})
    expect(menu).to_be_visible()
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    expect(menu.get_by_role("menuitem")).to_have_text(["Reply", "Copy"])
    expect(menu.get_by_role("menuitem", name="Reply")).to_be_focused()
    menu.get_by_role("menuitem", name="Reply").tap()
    expect(bob_page.get_by_text(f"Reply to {alice}")).to_be_visible()

    # The keyboard: the button is there when focused, and Shift+F10 on a message.
    actions.focus()
    actions.press("Enter")
    expect(menu).to_be_visible()
    bob_page.keyboard.press("Escape")
    expect(menu).to_be_hidden()
    expect(actions).to_be_focused()

    # On a desktop, a right click opens it too.
    mine = bubble(alice_page, "hold me down")
    mine.click(button="right")
    desktop_menu = alice_page.get_by_role("menu")
    expect(desktop_menu.get_by_role("menuitem")).to_have_text(["Reply", "Copy", "Edit", "Delete"])
    alice_page.keyboard.press("Escape")
    expect(desktop_menu).to_be_hidden()
    mine.focus()
    alice_page.keyboard.press("Shift+F10")
    expect(desktop_menu).to_be_visible()
    # Copy puts the text on the clipboard (it cannot be selected on a phone).
    desktop_menu.get_by_role("menuitem", name="Copy").click()
    assert alice_page.evaluate("() => navigator.clipboard.readText()") == "hold me down"


def background_of(page):
    return page.evaluate("() => getComputedStyle(document.body).backgroundColor")


LIGHT_BACKGROUND, DARK_BACKGROUND = "rgb(238, 241, 245)", "rgb(15, 18, 22)"


def test_the_theme_chosen_in_the_account_dialog_is_remembered_and_system_follows_the_system(
        chat_server, new_context):
    context = new_context(color_scheme="light")
    page = sign_up(context, chat_server, unique("alice"))
    assert background_of(page) == LIGHT_BACKGROUND
    dialog = open_account(page)
    expect(dialog.get_by_role("radio", name="System")).to_be_checked()
    expect(dialog.get_by_role("checkbox", name=re.compile("Play a sound"))).not_to_be_checked()
    dialog.get_by_role("radio", name="Dark").check()
    dialog.get_by_role("checkbox", name=re.compile("Play a sound")).check()
    assert background_of(page) == DARK_BACKGROUND

    # Remembered: after a reload, and on the sign-in page of this browser.
    page.reload()
    expect(page.get_by_text("Connecting…")).to_be_hidden()
    assert background_of(page) == DARK_BACKGROUND
    dialog = open_account(page)
    expect(dialog.get_by_role("radio", name="Dark")).to_be_checked()
    expect(dialog.get_by_role("checkbox", name=re.compile("Play a sound"))).to_be_checked()
    login = context.new_page()
    login.goto(chat_server.base + "/login")
    expect(login.get_by_role("button", name="Sign in")).to_be_visible()
    assert background_of(login) == DARK_BACKGROUND
    # The page arrives in the chosen theme, before any script runs: no light flash.
    assert '<html lang="en" data-theme="dark">' in context.request.get(chat_server.base + "/login").text()

    # Light wins over a dark system; System follows the system again.
    page.emulate_media(color_scheme="dark")
    dialog.get_by_role("radio", name="Light").check()
    assert background_of(page) == LIGHT_BACKGROUND
    dialog.get_by_role("radio", name="System").check()
    assert background_of(page) == DARK_BACKGROUND
    page.emulate_media(color_scheme="light")
    assert background_of(page) == LIGHT_BACKGROUND
    assert '<html lang="en">' in context.request.get(chat_server.base + "/login").text()
    page.reload()
    expect(page.get_by_text("Connecting…")).to_be_hidden()
    assert background_of(page) == LIGHT_BACKGROUND


# ---- the screenshots of the README and docs -------------------------------------------


def say(server, remote, to, body, at, reply_to=None, attachment=None):
    """A scripted client sends one message; it is then dated `at` in the database."""
    frame = {"type": "send", "to": to, "body": body, "client_id": uuid.uuid4().hex}
    if reply_to:
        frame["reply_to"] = reply_to
    if attachment:
        frame["attachment"] = attachment
    with remote.ws(server) as ws:
        ws.send(json.dumps(frame))
        message = receive(ws, "ack")["message"]
    set_sent_at(server, {body: at})
    return message


def uploaded(server, remote, name: str, kind: str, data: bytes) -> str:
    response = httpx.post(f"{server.base}/api/attachments", params={"name": name}, content=data,
                          headers={**remote.headers(), "content-type": kind}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["attachment"]["id"]


def mountain_photo() -> bytes:
    """A photo-like JPEG: a dawn sky over three ridges of mountains and a lake."""
    import random

    from PIL import Image, ImageDraw, ImageFilter

    width, height, horizon = 1200, 800, 560
    rng = random.Random(12)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(horizon):  # dawn: warm near the horizon, blue above
        t = y / horizon
        draw.line([(0, y), (width, y)], fill=(int(70 + 185 * t), int(110 + 90 * t), int(190 - 60 * t)))
    glow = Image.new("L", (width, height))
    ImageDraw.Draw(glow).ellipse([760, 330, 920, 490], fill=255)
    image.paste((255, 236, 180), mask=glow.filter(ImageFilter.GaussianBlur(30)))
    draw.ellipse([800, 370, 880, 450], fill=(255, 248, 220))
    for base, rough, colour in ((400, 90, (92, 96, 140)), (460, 70, (58, 66, 104)), (520, 50, (34, 44, 70))):
        y, ridge = base, []
        for x in range(0, width + 40, 40):
            y = min(max(y + rng.randint(-rough, rough) // 2, base - 2 * rough), horizon - 10)
            ridge.append((x, y))
        draw.polygon([(0, horizon), *ridge, (width, horizon)], fill=colour)
    lake = image.crop((0, horizon - 240, width, horizon)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    image.paste(Image.blend(lake, Image.new("RGB", lake.size, (30, 60, 90)), 0.45), (0, horizon))
    noise = Image.effect_noise((width, height), 12).convert("RGB")
    image = Image.blend(image, noise, 0.04).filter(ImageFilter.GaussianBlur(0.6))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=88)
    return out.getvalue()


def menu_pdf() -> bytes:
    """A one-page PDF of a dinner menu."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (1240, 1754), "white")
    draw = ImageDraw.Draw(page)
    draw.text((120, 140), "Trattoria da Luca", fill="black", font=ImageFont.load_default(72))
    for i, dish in enumerate(("Bruschetta", "Risotto ai funghi", "Pizza margherita", "Tiramisù")):
        draw.text((120, 320 + 90 * i), dish, fill=(60, 60, 60), font=ImageFont.load_default(44))
    out = io.BytesIO()
    page.save(out, "PDF", resolution=150)
    return out.getvalue()


def emoji_in_colour(page, emoji):
    """Whether Chromium draws `emoji` in colour with the page's font (a missing
    emoji font draws an empty box in the text's colour)."""
    return page.evaluate("""emoji => {
        const canvas = new OffscreenCanvas(64, 64), context = canvas.getContext("2d");
        context.font = `48px ${getComputedStyle(document.body).fontFamily}`;
        context.fillStyle = "#000";
        context.fillText(emoji, 4, 52);
        const pixels = context.getImageData(0, 0, 64, 64).data;
        let coloured = 0;
        for (let i = 0; i < pixels.length; i += 4) {
            const [r, g, b, a] = pixels.slice(i, i + 4);
            if (a > 128 && Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured += 1;
        }
        return coloured > 100;
    }""", emoji)


def test_the_screenshots_show_people_by_name_in_daytime_with_emoji_in_colour(tmp_path, new_context):
    """The README's and docs' screenshots: people with names, a morning in
    Berlin on a fixed clock, colour emoji. Saved where CHATX_SCREENSHOTS says."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", **SEED_LIMITS, **NO_GRACE,
                         **SIGNUPS}, tmp_path)
    server.start()
    try:
        berlin = ZoneInfo("Europe/Berlin")
        day = lambda d, h, m: datetime(2026, 3, d, h, m, tzinfo=berlin)  # noqa: E731 (12 March is a Thursday)
        people = {name: remote_sign_up(server, name) for name in ("maya", "jonas", "priya", "lena", "sam", "omar",
                                                         "olivia", "oscar")}
        omar = say(server, people["omar"], "maya", "Welcome to the team, Maya!", datetime(2026, 1, 20, 9, 15, tzinfo=berlin))
        say(server, people["sam"], "maya", "Happy birthday! 🎂", day(2, 8, 30))
        sam = say(server, people["maya"], "sam", "Thank you! 🥳", day(2, 9, 1))
        market = say(server, people["lena"], "maya", "See you at the market on Saturday 🍓", day(9, 17, 45))
        say(server, people["maya"], "priya", "Here are the slides for tomorrow", day(11, 16, 20))
        say(server, people["priya"], "maya", "Thanks, they look great! One question about slide 4", day(11, 18, 2))
        say(server, people["jonas"], "maya", "Morning! Are we still on for the climbing gym tonight?", day(12, 10, 2))
        say(server, people["maya"], "jonas", "Yes! 7 pm works for me 🧗", day(12, 10, 4))
        say(server, people["maya"], "jonas", "Can you bring the spare chalk bag?", day(12, 10, 5))
        lena = say(server, people["jonas"], "maya", "Sure. Lena might join too 🙌", day(12, 10, 31))
        photo = uploaded(server, people["jonas"], "crag-at-dawn.jpg", "image/jpeg", mountain_photo())
        view = say(server, people["jonas"], "maya", "The view from the crag on Sunday ⛰️", day(12, 10, 33),
                   attachment=photo)
        say(server, people["maya"], "jonas", "Great 🙂 I'll book a table for dinner afterwards.", day(12, 10, 38),
            reply_to=lena["id"])
        menu = uploaded(server, people["maya"], "trattoria-menu.pdf", "application/pdf", menu_pdf())
        say(server, people["maya"], "jonas", "The menu, if you want to choose ahead", day(12, 10, 39),
            attachment=menu)
        people["maya"].put(server, "/api/blocks/sam").raise_for_status()
        # maya has read all but priya's question.
        with people["maya"].ws(server) as ws:
            read = {"omar": omar["id"], "sam": sam["id"], "lena": market["id"], "jonas": view["id"]}
            for peer, up_to in read.items():
                ws.send(json.dumps({"type": "read", "with": peer, "up_to": up_to}))
                assert receive(ws, "read")["up_to"] == up_to

        clock = {"locale": "en-US", "timezone_id": "Europe/Berlin", "reduced_motion": "reduce"}
        now = day(12, 10, 42)
        jonas_context = new_context(**clock)
        jonas_context.clock.set_fixed_time(now)
        jonas_page = sign_in(jonas_context, server, "jonas")
        open_chat(jonas_page, "maya")  # online, and has read everything

        desktop = new_context(viewport={"width": 1200, "height": 720}, **clock)
        desktop.clock.set_fixed_time(now)
        page = desktop.new_page()
        page.goto(server.base + "/login")
        page.get_by_label("Username").fill("maya")
        snap(page, "sign-in.png")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(server.base + "/")
        open_chat(page, "jonas")
        last = bubble(page, "Great 🙂 I'll book a table for dinner afterwards.")
        expect(last.locator(".tick")).to_have_text("✓✓")
        expect(last.locator("time")).to_have_text("10:38 AM")
        expect(page.get_by_role("img", name="crag-at-dawn.jpg")).to_be_visible()
        expect(page.get_by_role("link", name=re.compile("trattoria-menu.pdf"))).to_be_visible()
        expect(contact(page, "priya").locator(".badge")).to_contain_text("1")
        expect(contact(page, "priya").locator("time")).to_have_text("Yesterday")
        jonas_page.get_by_role("textbox", name="Message").press_sequentially("On my")
        expect(page.get_by_text("jonas is typing…")).to_be_visible()
        assert emoji_in_colour(page, "🙌"), "no colour emoji font: install fonts-noto-color-emoji (make test does)"
        page.evaluate("() => document.activeElement.blur()")
        snap(page, "chat-desktop.png")
        page.emulate_media(color_scheme="dark")
        snap(page, "chat-dark.png")
        page.emulate_media(color_scheme="light")

        open_account(page)
        snap(page, "account.png")
        page.keyboard.press("Escape")
        page.get_by_role("searchbox", name="Search people").fill("")
        find_person(page, "olivia", "o")  # and omar and oscar: people found by the start of their name
        snap(page, "search-people.png")
        page.get_by_role("searchbox", name="Search people").press("Escape")
        open_chat(page, "sam")
        expect(page.get_by_text("You blocked sam.")).to_be_visible()
        snap(page, "chat-blocked.png")

        phone = new_context(viewport={"width": 390, "height": 760}, is_mobile=True, has_touch=True,
                            device_scale_factor=2, **clock)
        phone.clock.set_fixed_time(now)
        phone_page = sign_in(phone, server, "maya")
        expect(contact(phone_page, "jonas")).to_be_visible()
        snap(phone_page, "phone-contacts.png")
        open_chat(phone_page, "jonas")
        expect(bubble(phone_page, "Sure. Lena might join too 🙌")).to_be_visible()
        phone_page.evaluate("() => document.activeElement.blur()")
        snap(phone_page, "phone-conversation.png")
    finally:
        server.stop()


def test_a_message_arriving_in_a_background_tab_beeps_only_once_the_sound_is_turned_on(chat_server, new_context):
    alice, bob = unique("alice"), unique("bob")
    bob_remote = remote_sign_up(chat_server, bob)
    context = new_context()
    # Counts the tones started, and lets the test say whether the tab is in the background.
    context.add_init_script("""
        window.tones = 0;
        const start = OscillatorNode.prototype.start;
        OscillatorNode.prototype.start = function (...args) { window.tones += 1; return start.apply(this, args); };
        Object.defineProperty(Document.prototype, "hidden", { get: () => Boolean(window.inBackground) });
    """)
    page = sign_up(context, chat_server, alice)
    remote_send(chat_server, bob_remote, alice, "first, in the foreground")
    expect(contact(page, bob)).to_be_visible()
    page.evaluate("() => { window.inBackground = true; }")
    remote_send(chat_server, bob_remote, alice, "second, sound off")
    expect(contact(page, bob).locator(".preview")).to_have_text("second, sound off")
    assert page.evaluate("() => window.tones") == 0

    page.evaluate("() => { window.inBackground = false; }")
    open_account(page).get_by_role("checkbox", name=re.compile("Play a sound")).check()
    page.keyboard.press("Escape")
    remote_send(chat_server, bob_remote, alice, "third, in the foreground")
    expect(contact(page, bob).locator(".preview")).to_have_text("third, in the foreground")
    assert page.evaluate("() => window.tones") == 0
    page.evaluate("() => { window.inBackground = true; }")
    remote_send(chat_server, bob_remote, alice, "fourth, in the background")
    expect(contact(page, bob).locator(".preview")).to_have_text("fourth, in the background")
    assert page.evaluate("() => window.tones") == 1
