// The chat page: keeps contacts and conversations in step with the server and
// hands the views what they need to draw.
import { api, goTo, socketUrl } from "./api.js";
import { ReconnectingSocket } from "./socket.js";
import { Conversation, Outbox, keyOf } from "./store.js";
import { ContactList } from "./contacts.js";
import { MessageView } from "./messages.js";
import { Composer } from "./composer.js";
import { fillAvatar } from "./dom.js";
import { lastSeen } from "./timefmt.js";
import { notifyMessage, setupNotificationButton, showUnreadInTitle } from "./notify.js";

const PAGE = 50;
const PEEKERS = 4;
const TYPING_SHOWN_FOR = 5000;
const TIMES_REFRESH = 30000;

const $ = (id) => document.getElementById(id);
const me = document.body.dataset.username;
const meKey = keyOf(me);
const outbox = new Outbox(`chatx.outbox.${meKey}`);
const contacts = new Map(); // key -> {key, username, status, lastSeen, unread, lastId, typing}
const conversations = new Map(); // key -> Conversation
const drafts = new Map();
let openKey = null;
let highestId = 0; // of messages this page has received; the next connection asks for the ones after it
let usersLoaded = false;
let helloCount = 0;

const app = $("app");
const contactList = new ContactList($("contacts"), $("filter"), $("contacts-empty"), (key) => navigate(key));
const view = new MessageView($("log"), $("jump"), {
  onNearTop: () => loadOlder(conversations.get(openKey)),
  onScrolled: scheduleReadCheck,
  onDiscard: (clientId) => {
    outbox.remove(clientId);
    view.sync();
  },
});
const composer = new Composer($("composer"), { onSend: send, onTyping: sendTyping });
const socket = new ReconnectingSocket(() => socketUrl(highestId), {
  onFrame,
  onState: showConnection,
  onSignedOut: () => goTo("/login"),
  onRefused: checkSession,
});

// ---- contacts and conversations

function contactFor(username) {
  const key = keyOf(username);
  if (!contacts.has(key)) {
    contacts.set(key, { key, username, status: "offline", lastSeen: null, unread: 0, lastId: 0, typing: false });
  }
  return contacts.get(key);
}

function conversationFor(key) {
  if (!conversations.has(key)) conversations.set(key, new Conversation(contacts.get(key).username, meKey, outbox));
  return conversations.get(key);
}

function applyUser(user, withUnread) {
  const isNew = !contacts.has(keyOf(user.username));
  const contact = contactFor(user.username);
  contact.status = user.status;
  contact.lastSeen = user.last_seen;
  if (isNew || withUnread) contact.unread = user.unread;
}

async function loadUsers(withUnread) {
  const { users } = await api("GET", "/api/users");
  for (const user of users) applyUser(user, withUnread);
  usersLoaded = true;
  scheduleRender();
}

function mergePage(conversation, page) {
  const contact = contacts.get(conversation.key);
  for (const message of page.messages) {
    conversation.add(message);
    contact.lastId = Math.max(contact.lastId, message.id);
  }
  for (const [username, upTo] of Object.entries(page.read_up_to)) {
    if (keyOf(username) === meKey) conversation.myRead = Math.max(conversation.myRead, upTo);
    else conversation.peerRead = Math.max(conversation.peerRead, upTo);
  }
}

function messagesPath(conversation, query) {
  return `/api/conversations/${encodeURIComponent(conversation.peer)}/messages?${query}`;
}

// The newest message of every conversation: sorts the contacts and tells
// where the live stream has to start.
async function peekConversations() {
  const queue = [...contacts.values()];
  const peek = async () => {
    for (let contact = queue.shift(); contact; contact = queue.shift()) {
      const conversation = conversationFor(contact.key);
      try {
        mergePage(conversation, await api("GET", messagesPath(conversation, "limit=1")));
      } catch {
        // the contact stays unsorted; its messages still arrive live
      }
    }
  };
  await Promise.all(Array.from({ length: PEEKERS }, peek));
  for (const conversation of conversations.values()) highestId = Math.max(highestId, conversation.newestId);
}

async function loadLatest(conversation) {
  view.setBusy(true);
  try {
    const page = await api("GET", messagesPath(conversation, `limit=${PAGE}`));
    mergePage(conversation, page);
    conversation.loaded = true;
    conversation.hasOlder = page.has_more;
  } catch (error) {
    if (error.status === 401) goTo("/login");
    return; // tried again when the connection is back
  } finally {
    view.setBusy(false);
  }
  if (openKey !== conversation.key) return;
  view.sync("bottom");
  fillViewport(conversation);
  scheduleRender();
}

async function loadOlder(conversation) {
  if (!conversation || !conversation.loaded || !conversation.hasOlder || conversation.loadingOlder) return;
  conversation.loadingOlder = true;
  view.setBusy(true);
  view.sync("prepend");
  try {
    const page = await api("GET", messagesPath(conversation, `before=${conversation.oldestId}&limit=${PAGE}`));
    mergePage(conversation, page);
    conversation.hasOlder = page.has_more;
  } catch {
    // the next scroll to the top tries again
  } finally {
    conversation.loadingOlder = false;
    view.setBusy(false);
  }
  if (openKey !== conversation.key) return;
  view.sync("prepend");
  fillViewport(conversation);
}

// A first page shorter than the screen could never be scrolled up.
function fillViewport(conversation) {
  if (conversation.hasOlder && view.needsMore) loadOlder(conversation);
}

// ---- frames from the server

function onFrame(frame) {
  const handler = {
    hello: onHello,
    message: (f) => onMessage(f.message),
    ack: onAck,
    typing: onTyping,
    read: onRead,
    presence: onPresence,
    error: onError,
  }[frame.type];
  handler?.(frame);
}

function onHello(frame) {
  helloCount += 1;
  const online = new Set(frame.presence.map((entry) => keyOf(entry.username)));
  for (const contact of contacts.values()) {
    if (!online.has(contact.key)) contact.status = "offline";
  }
  for (const entry of frame.presence) onPresence(entry);
  // Who signed up, or when people left, while this page was not connected.
  if (helloCount > 1 || !usersLoaded) loadUsers(!usersLoaded).catch(() => {});
  const open = conversations.get(openKey);
  if (open && !open.loaded) loadLatest(open);
  for (const entry of outbox.unsent()) socket.send(sendFrame(entry));
  scheduleRender("auto");
}

function onMessage(message) {
  highestId = Math.max(highestId, message.id);
  receive(message);
}

function onAck(frame) {
  outbox.remove(frame.client_id);
  receive(frame.message);
}

function receive(message) {
  const mine = keyOf(message.from) === meKey;
  const peer = mine ? message.to : message.from;
  if (keyOf(peer) === meKey) return; // notes to self have no place in this interface
  if (mine && message.client_id) outbox.remove(message.client_id);
  const contact = contactFor(peer);
  const conversation = conversationFor(contact.key);
  if (conversation.add(message)) {
    contact.lastId = Math.max(contact.lastId, message.id);
    if (!mine) {
      stopTyping(contact);
      if (message.id > conversation.myRead) {
        contact.unread += 1;
        notifyMessage(message, () => navigate(contact.key));
      }
    }
  }
  scheduleRender(mine ? "bottom" : "auto");
}

function onTyping(frame) {
  const contact = contacts.get(keyOf(frame.from));
  if (!contact) return;
  contact.typing = true;
  clearTimeout(contact.typingTimer);
  contact.typingTimer = setTimeout(() => {
    stopTyping(contact);
    scheduleRender();
  }, TYPING_SHOWN_FOR);
  scheduleRender();
}

function stopTyping(contact) {
  contact.typing = false;
  clearTimeout(contact.typingTimer);
}

function onRead(frame) {
  if (keyOf(frame.reader) === meKey) {
    const contact = contacts.get(keyOf(frame.with));
    if (!contact) return;
    const conversation = conversationFor(contact.key);
    conversation.myRead = Math.max(conversation.myRead, frame.up_to);
    updateUnread(contact, conversation);
  } else if (keyOf(frame.with) === meKey && contacts.has(keyOf(frame.reader))) {
    const conversation = conversationFor(keyOf(frame.reader));
    conversation.peerRead = Math.max(conversation.peerRead, frame.up_to);
  }
  scheduleRender("auto");
}

function updateUnread(contact, conversation) {
  if (conversation.myRead >= contact.lastId) contact.unread = 0;
  else if (conversation.loaded) contact.unread = conversation.unreadAfter(conversation.myRead);
}

function onPresence(frame) {
  if (keyOf(frame.username) === meKey) return;
  const contact = contactFor(frame.username); // someone new signed up: they appear
  // Frames from different server processes can arrive out of order: the later change wins.
  if (frame.last_seen && contact.lastSeen && frame.last_seen < contact.lastSeen) return;
  contact.status = frame.status;
  contact.lastSeen = frame.last_seen ?? contact.lastSeen;
  if (frame.status === "offline") stopTyping(contact);
  scheduleRender();
}

function onError(frame) {
  if (!frame.client_id) {
    console.warn("ChatX:", frame.code, frame.detail);
    return;
  }
  if (frame.code === "rate_limited") {
    setTimeout(() => {
      const entry = outbox.unsent().find((candidate) => candidate.client_id === frame.client_id);
      if (entry) socket.send(sendFrame(entry));
    }, 2000);
    return;
  }
  outbox.fail(frame.client_id, frame.detail);
  scheduleRender("auto");
}

// ---- what this page sends

function sendFrame(entry) {
  return { type: "send", to: entry.to, body: entry.body, client_id: entry.client_id };
}

// Shown as pending at once; sent now or as soon as the connection is back,
// always with the same client_id, so the server never stores it twice.
function send(body) {
  const conversation = conversations.get(openKey);
  if (!conversation) return;
  socket.send(sendFrame(outbox.add(conversation.peer, body)));
  view.sync("bottom");
}

function sendTyping() {
  if (openKey) socket.send({ type: "typing", to: contacts.get(openKey).username });
}

let readCheckQueued = false;

function scheduleReadCheck() {
  if (readCheckQueued) return;
  readCheckQueued = true;
  setTimeout(() => {
    readCheckQueued = false;
    markRead();
  }, 100);
}

// Read means on screen, in a window the person is looking at.
function markRead() {
  if (!openKey || document.visibilityState !== "visible" || !document.hasFocus()) return;
  const contact = contacts.get(openKey);
  const conversation = conversations.get(openKey);
  const id = view.newestVisibleFromPeer();
  if (id <= conversation.myRead) return;
  if (!socket.send({ type: "read", with: contact.username, up_to: id })) return;
  conversation.myRead = id;
  updateUnread(contact, conversation);
  scheduleRender();
}

// ---- drawing

let renderQueued = false;
let logMode = null;

// Many frames can arrive at once (a replay after reconnecting): draw once.
function scheduleRender(mode) {
  if (mode === "bottom" || (mode && !logMode)) logMode = mode;
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => {
    renderQueued = false;
    contactList.render(contacts.values(), openKey);
    showUnreadInTitle([...contacts.values()].reduce((sum, contact) => sum + contact.unread, 0));
    renderHeader();
    if (logMode && openKey) view.sync(logMode);
    logMode = null;
    scheduleReadCheck();
  }, 0);
}

function renderHeader() {
  const contact = contacts.get(openKey);
  if (!contact) return;
  $("peer-name").textContent = contact.username;
  fillAvatar($("peer-avatar"), contact.username);
  const status = $("peer-status");
  status.textContent = contact.status === "online" ? "online" : lastSeen(contact.lastSeen);
  status.classList.toggle("online", contact.status === "online");
  $("typing").textContent = contact.typing ? `${contact.username} is typing…` : "";
}

function showConnection(state) {
  const banner = $("connection");
  banner.textContent = state === "open" ? "" : state === "connecting" ? "Connecting…" : "Reconnecting…";
  app.classList.toggle("disconnected", state !== "open");
}

// ---- navigation: the open conversation lives in the URL's fragment

function navigate(key) {
  const hash = key ? `#${encodeURIComponent(contacts.get(key).username)}` : "";
  if (location.hash !== hash) history.pushState(key ? { fromList: true } : null, "", hash || location.pathname);
  route();
}

function route() {
  const key = keyOf(decodeURIComponent(location.hash.slice(1)));
  if (contacts.has(key)) openChat(key);
  else closeChat();
}

function openChat(key) {
  if (openKey !== key) {
    const draft = composer.swap(drafts.get(key) ?? "");
    if (openKey) drafts.set(openKey, draft);
    openKey = key;
    showConversation(true);
    const conversation = conversationFor(key);
    view.open(conversation);
    if (!conversation.loaded) loadLatest(conversation);
  }
  app.dataset.view = "conversation";
  composer.focus();
  scheduleRender();
}

function closeChat() {
  const previous = openKey;
  if (openKey) drafts.set(openKey, composer.swap(""));
  openKey = null;
  app.dataset.view = "contacts";
  showConversation(false);
  scheduleRender();
  if (previous) setTimeout(() => contactList.focus(previous), 0);
}

function showConversation(shown) {
  $("placeholder").hidden = shown;
  for (const id of ["conversation-head", "log-wrap", "composer"]) $(id).hidden = !shown;
  if (!shown) $("typing").textContent = "";
}

async function checkSession() {
  try {
    await api("GET", "/api/me");
  } catch (error) {
    if (error.status === 401) goTo("/login");
  }
}

async function signOut() {
  await api("POST", "/api/logout").catch(() => {});
  outbox.clear();
  goTo("/login");
}

async function start() {
  showConnection("connecting");
  setupNotificationButton($("notify"));
  $("sign-out").addEventListener("click", signOut);
  $("back").addEventListener("click", () => (history.state?.fromList ? history.back() : navigate(null)));
  window.addEventListener("popstate", route);
  window.addEventListener("focus", scheduleReadCheck);
  document.addEventListener("visibilitychange", scheduleReadCheck);
  setInterval(() => {
    contactList.refreshTimes(contacts.values());
    renderHeader();
  }, TIMES_REFRESH);
  try {
    await loadUsers(true);
  } catch (error) {
    if (error.status === 401) return goTo("/login");
  }
  route();
  await peekConversations();
  scheduleRender();
  socket.start();
}

start();
