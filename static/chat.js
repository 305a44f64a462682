// The chat page: keeps contacts and conversations in step with the server and
// hands the views what they need to draw.
import { api, goTo, goToSignIn, socketUrl } from "./api.js";
import { ReconnectingSocket } from "./socket.js";
import { Stream } from "./stream.js";
import { Conversation, Outbox, keyOf } from "./store.js";
import { ContactList } from "./contacts.js";
import { PeopleSearch } from "./people.js";
import { MessageView, snippet } from "./messages.js";
import { Composer } from "./composer.js";
import { fillAvatar } from "./dom.js";
import { lastSeen } from "./timefmt.js";
import { notifyMessage, setupNotificationButton, showUnreadInTitle } from "./notify.js";

const PAGE = 50;
const CONVERSATIONS_PAGE = 50;
const HELLO_WAIT = 5000;
const LIST_RETRY_MAX = 30000;
const NEAR_LIST_END = 200;
const TYPING_SHOWN_FOR = 5000;
const TIMES_REFRESH = 30000;
const USERNAME_RE = /^[A-Za-z0-9_.-]{3,32}$/;

const $ = (id) => document.getElementById(id);
const me = document.body.dataset.username;
const meKey = keyOf(me);
const outbox = new Outbox(`chatx.outbox.${meKey}`);
// Everyone this page knows of: the people of my conversations (`listed`, shown
// in the contact list) and anyone opened from the search or a link.
const contacts = new Map(); // key -> {key, username, status, lastSeen, unread, lastId, typing, listed, ...}
const conversations = new Map(); // key -> Conversation
const drafts = new Map();
let openKey = null;
// The contact list comes from GET /api/conversations, newest first, a page at a time.
const list = { loaded: false, loading: false, hasMore: false, before: null, retryAt: 0 };
// The people I block (keys), from GET /api/blocks the first time a conversation opens.
const blocks = { keys: new Set(), loaded: null };
let connected = false;
let signingOut = false; // signed out here: the sign-in page comes back to no conversation

const app = $("app");
const contactList = new ContactList($("contacts"), $("contacts-empty"), (key) => navigate(key));
const search = new PeopleSearch(
  { input: $("search"), section: $("people-section"), list: $("people"), note: $("people-note"), more: $("people-more") },
  { onQuery: (query) => contactList.setFilter(query), onChoose: chooseFromSearch },
);
const view = new MessageView($("log"), $("jump"), {
  onNearTop: () => loadOlder(conversations.get(openKey)),
  onScrolled: scheduleReadCheck,
  onDiscard: (clientId) => {
    outbox.remove(clientId);
    view.sync();
  },
  onReply: (message) => {
    const name = conversations.get(openKey).isMine(message) ? "yourself" : message.from;
    composer.startReply(message, name, snippet(message));
  },
  onEdit: (message) => composer.startEdit(message),
  onDelete: confirmDelete,
  onQuote: showOriginal,
});
const composer = new Composer($("composer"), {
  onSend: send,
  onTyping: sendTyping,
  onEdit: (id, body) => socket.send({ type: "edit", id, body }),
  lastEditable,
  onModeChange: () => {},
});
const stream = new Stream(onFrame);
const socket = new ReconnectingSocket(() => socketUrl(stream.seq), {
  onFrame: (frame) => stream.receive(frame),
  onState: showConnection,
  onSignedOut: () => (signingOut ? goTo("/login") : goToSignIn()),
  onRefused: checkSession,
});

// ---- contacts and conversations

function contactFor(username) {
  const key = keyOf(username);
  if (!contacts.has(key)) {
    contacts.set(key, {
      key, username, status: "offline", lastSeen: null, unread: 0, typing: false,
      listed: false, // a conversation exists: shown in the contact list
      lastId: 0, // the newest message of the conversation this page knows of
      last: null, // that message, for the preview in the list
      lastMine: false,
      blockedMe: false, // a message of mine was refused with `blocked`
      snapshotId: 0, // the newest message the last GET /api/conversations counted in `unread`
      presenceLive: false, // status came from the socket, which beats any HTTP snapshot
    });
  }
  return contacts.get(key);
}

function conversationFor(key) {
  if (!conversations.has(key)) conversations.set(key, new Conversation(contacts.get(key).username, meKey, outbox));
  return conversations.get(key);
}

// A status from HTTP (conversation list, search): kept unless the socket said more.
function applyStatus(contact, status, lastSeenAt) {
  if (contact.presenceLive) return;
  contact.status = status;
  contact.lastSeen = lastSeenAt;
}

// The newest message of a conversation (or a newer state of it) for its preview.
// (The conversation keeps the latest state of each message: pass what it holds.)
function noteLast(contact, message) {
  if (!message || (contact.last && message.id < contact.last.id)) return;
  contact.last = message;
  contact.lastMine = keyOf(message.from) === meKey;
}

function mergeReads(conversation, readUpTo) {
  for (const [username, upTo] of Object.entries(readUpTo || {})) {
    if (keyOf(username) === meKey) conversation.myRead = Math.max(conversation.myRead, upTo);
    else conversation.peerRead = Math.max(conversation.peerRead, upTo);
  }
}

// One item of GET /api/conversations. Its `unread` counts every message up to
// its last_message; messages newer than that are counted as they arrive.
function applyConversation(item) {
  if (keyOf(item.user.username) === meKey) return; // notes to self have no place in this interface
  const contact = contactFor(item.user.username);
  const conversation = conversationFor(contact.key);
  const last = item.last_message;
  contact.listed = true;
  applyStatus(contact, item.status, item.last_seen);
  if (last) {
    if (last.id >= contact.lastId) contact.unread = item.unread;
    contact.snapshotId = Math.max(contact.snapshotId, last.id);
    contact.lastId = Math.max(contact.lastId, last.id);
    conversation.put(last);
    noteLast(contact, conversation.messages.get(last.id));
  }
  mergeReads(conversation, item.read_up_to);
  if (conversation.myRead >= contact.lastId) contact.unread = 0;
}

// The first page, or (more) the next older one.
async function loadConversations(more) {
  if (list.loading || (more && !list.hasMore)) return;
  list.loading = true;
  $("contacts-more").hidden = !more;
  try {
    const query = more ? `?before=${list.before}&limit=${CONVERSATIONS_PAGE}` : `?limit=${CONVERSATIONS_PAGE}`;
    const page = await api("GET", `/api/conversations${query}`);
    for (const item of page.conversations) applyConversation(item);
    const oldest = page.conversations.at(-1)?.last_message?.id;
    if (more || !list.loaded) {
      list.hasMore = page.has_more;
      if (oldest !== undefined) list.before = oldest;
    }
    list.loaded = true;
  } finally {
    list.loading = false;
    $("contacts-more").hidden = true;
  }
  scheduleRender();
}

// Until the first page is here, nothing else can be shown: try until it works.
async function loadFirstConversations() {
  for (let delay = 1000; ; delay = Math.min(delay * 2, LIST_RETRY_MAX)) {
    try {
      await loadConversations(false);
      contactList.setProblem("");
      return true;
    } catch (error) {
      if (error.status === 401) {
        goToSignIn();
        return false;
      }
      contactList.setProblem("Can't load your conversations right now. Trying again…");
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

// Scrolled near the end of the list: the next page of older conversations.
// (Not while searching: a list narrowed down by name is always short.)
function loadMoreIfNearEnd() {
  const lists = $("sidebar-lists");
  if (!list.loaded || !list.hasMore || list.loading || contactList.query || Date.now() < list.retryAt) return;
  if (lists.scrollHeight - lists.scrollTop - lists.clientHeight > NEAR_LIST_END) return;
  loadConversations(true).then(loadMoreIfNearEnd, () => {
    list.retryAt = Date.now() + LIST_RETRY_MAX / 6;
  });
}

function chooseFromSearch(user) {
  const contact = contactFor(user.username);
  applyStatus(contact, user.status, user.last_seen);
  search.clear();
  navigate(contact.key);
}

function mergePage(conversation, page) {
  const contact = contacts.get(conversation.key);
  for (const message of page.messages) {
    conversation.put(message);
    contact.lastId = Math.max(contact.lastId, message.id);
  }
  const newest = conversation.sorted().at(-1);
  if (newest) noteLast(contact, newest);
  // History with someone found by search or a link: that is a conversation.
  if (page.messages.length) contact.listed = true;
  mergeReads(conversation, page.read_up_to);
}

function messagesPath(conversation, query) {
  return `/api/conversations/${encodeURIComponent(conversation.peer)}/messages?${query}`;
}

async function loadLatest(conversation) {
  view.setBusy(true);
  try {
    const page = await api("GET", messagesPath(conversation, `limit=${PAGE}`));
    mergePage(conversation, page);
    conversation.loaded = true;
    conversation.hasOlder = page.has_more;
  } catch (error) {
    if (error.status === 401) goToSignIn();
    return; // tried again when the connection is back
  } finally {
    view.setBusy(false);
  }
  if (openKey !== conversation.key) return;
  // Opened at the first unread message, under an "Unread messages" divider.
  view.markUnread(firstUnread(conversation));
  view.sync("unread");
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

// The first message from the peer that was unread when the conversation was opened.
function firstUnread(conversation) {
  const cursor = conversation.readWhenOpened ?? conversation.myRead;
  return conversation.sorted().find((message) => message.id > cursor
    && !conversation.isMine(message) && !message.deleted)?.id ?? null;
}

// A click on a quote: the original, loading older pages until it is there.
async function showOriginal(id) {
  const conversation = conversations.get(openKey);
  for (let pages = 0; conversation && !view.showMessage(id); pages += 1) {
    if (pages >= 20 || !conversation.hasOlder || conversation.oldestId <= id) return;
    await loadOlder(conversation);
    if (openKey !== conversation.key) return;
  }
}

// ↑ in an empty message box: my last message that can still be edited.
function lastEditable() {
  const conversation = conversations.get(openKey);
  if (!conversation) return null;
  const mine = conversation.sorted().filter((message) => conversation.isMine(message) && !message.deleted);
  return mine.at(-1) ?? null;
}

function confirmDelete(message) {
  const dialog = $("confirm-delete");
  dialog.returnValue = "";
  dialog.onclose = () => {
    if (dialog.returnValue === "delete") socket.send({ type: "delete", id: message.id });
    composer.focus();
  };
  dialog.showModal();
}

// A first page shorter than the screen could never be scrolled up.
function fillViewport(conversation) {
  if (conversation.hasOlder && view.needsMore) loadOlder(conversation);
}

// ---- frames from the server

function onFrame(frame) {
  const handler = {
    hello: onHello,
    message: (f) => receive(f.message),
    edit: onChange,
    delete: onChange,
    ack: onAck,
    typing: onTyping,
    read: onRead,
    presence: onPresence,
    error: onError,
  }[frame.type];
  handler?.(frame);
}

// hello lists the people of my conversations who are online; the others are
// offline. (Someone opened from the search is not covered: their status stays.)
function onHello(frame) {
  const online = new Set((frame.presence || []).map((entry) => keyOf(entry.username)));
  for (const contact of contacts.values()) {
    if (!contact.listed || online.has(contact.key)) continue;
    if (contact.status === "online") stopTyping(contact);
    contact.status = "offline";
    contact.presenceLive = true;
  }
  for (const entry of frame.presence || []) onPresence(entry);
  const open = conversations.get(openKey);
  if (open && !open.loaded) loadLatest(open);
  for (const entry of outbox.unsent()) socket.send(sendFrame(entry));
  scheduleRender("auto");
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
  contact.listed = true; // a first message makes a conversation: it goes to the top of the list
  contact.lastId = Math.max(contact.lastId, message.id);
  if (mine) contact.blockedMe = false; // stored: whatever block there was is gone
  // Counted unless the conversation list already counted it (or it was here already).
  if (conversation.put(message) === "added" && !mine) {
    stopTyping(contact);
    if (message.id > contact.snapshotId && message.id > conversation.myRead && !message.deleted) {
      contact.unread += 1;
      notifyMessage(message, () => navigate(contact.key));
    }
  }
  noteLast(contact, conversation.messages.get(message.id));
  scheduleRender(mine ? "bottom" : "auto");
}

// An edit or a delete, by either of us: shown wherever the message is.
function onChange(frame) {
  const message = frame.message;
  const peer = keyOf(message.from) === meKey ? message.to : message.from;
  const conversation = conversations.get(keyOf(peer));
  if (!conversation?.change(message)) return;
  const contact = contacts.get(conversation.key);
  if (contact) noteLast(contact, conversation.messages.get(message.id));
  if (message.deleted && openKey === conversation.key) composer.forget(message.id);
  scheduleRender("auto");
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
  // Only the people of my conversations (or someone becoming one) have presence.
  const contact = contactFor(frame.username);
  // Frames from different server processes can arrive out of order: the later change wins.
  if (frame.last_seen && contact.lastSeen && frame.last_seen < contact.lastSeen) return;
  contact.presenceLive = true;
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
  const entry = outbox.unsent().find((candidate) => candidate.client_id === frame.client_id);
  if (frame.code === "blocked" && entry) contactFor(entry.to).blockedMe = true;
  outbox.fail(frame.client_id, frame.code === "blocked" ? `${entry?.to ?? "They"} isn't accepting your messages.` : frame.detail);
  scheduleRender("auto");
}

// ---- what this page sends

function sendFrame(entry) {
  const frame = { type: "send", to: entry.to, body: entry.body, client_id: entry.client_id };
  if (entry.reply_to) frame.reply_to = entry.reply_to;
  return frame;
}

// Shown as pending at once; sent now or as soon as the connection is back,
// always with the same client_id, so the server never stores it twice.
function send(body, replyTo) {
  const conversation = conversations.get(openKey);
  if (!conversation) return;
  socket.send(sendFrame(outbox.add(conversation.peer, body, replyTo)));
  view.markUnread(null); // answering: what was unread has been seen
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
  if (!conversation.loaded) return; // the page on screen is not the conversation yet
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
    contactList.render([...contacts.values()].filter((contact) => contact.listed), openKey, connected);
    showUnreadInTitle([...contacts.values()].reduce((sum, contact) => sum + contact.unread, 0));
    renderHeader();
    if (logMode && openKey) view.sync(logMode);
    logMode = null;
    scheduleReadCheck();
    loadMoreIfNearEnd(); // a first page that does not fill the list could never be scrolled
  }, 0);
}

function renderHeader() {
  const contact = contacts.get(openKey);
  if (!contact) return;
  $("peer-name").textContent = contact.username;
  fillAvatar($("peer-avatar"), contact.username);
  const status = $("peer-status");
  const blocked = blocks.keys.has(contact.key);
  // While the connection is down nobody's presence is known.
  status.textContent = blocked ? "blocked" : !connected ? "waiting for the connection…"
    : contact.status === "online" ? "online" : lastSeen(contact.lastSeen);
  status.classList.toggle("online", connected && !blocked && contact.status === "online");
  $("typing").textContent = contact.typing && connected ? `${contact.username} is typing…` : "";
  renderBlock(contact, blocked);
}

// ---- blocking, from the conversation header

function renderBlock(contact, blocked) {
  const button = $("block");
  button.hidden = blocks.loaded !== true;
  button.textContent = blocked ? "Unblock" : "Block";
  button.setAttribute("aria-label", `${blocked ? "Unblock" : "Block"} ${contact.username}`);
  const notice = $("block-notice");
  const text = blocked
    ? `You blocked ${contact.username}. They can't send you messages, and neither of you sees the other online.`
    : contact.blockedMe ? `${contact.username} isn't accepting messages from you.` : "";
  notice.hidden = !text;
  if ($("block-text").textContent !== text) $("block-text").textContent = text;
  $("unblock").hidden = !blocked;
  $("unblock").setAttribute("aria-label", `Unblock ${contact.username}`);
  $("composer").hidden = blocked || !openKey;
}

async function loadBlocks() {
  if (blocks.loaded) return;
  blocks.loaded = "loading";
  try {
    const page = await api("GET", "/api/blocks");
    for (const user of page.blocks) blocks.keys.add(keyOf(user.username));
    blocks.loaded = true;
  } catch (error) {
    blocks.loaded = null; // tried again when a conversation opens
    if (error.status === 401) goToSignIn();
  }
  scheduleRender();
}

async function setBlock(key, block) {
  const contact = contacts.get(key);
  const button = $("block");
  button.disabled = true;
  try {
    await api(block ? "PUT" : "DELETE", `/api/blocks/${encodeURIComponent(contact.username)}`);
    if (block) {
      blocks.keys.add(key);
      stopTyping(contact);
      contact.status = "offline"; // no presence either way while the block lasts
    } else {
      blocks.keys.delete(key);
      refreshPresence(contact);
    }
  } catch (error) {
    if (error.status === 401) goToSignIn();
  } finally {
    button.disabled = false;
  }
  scheduleRender();
  if (openKey === key) (block ? $("unblock") : composer).focus();
}

// After an unblock: presence is shared again from now on.
async function refreshPresence(contact) {
  try {
    const { users } = await api("GET", `/api/users?q=${encodeURIComponent(contact.username)}&limit=1`);
    const user = users.find((candidate) => keyOf(candidate.username) === contact.key);
    if (user && !blocks.keys.has(contact.key)) {
      contact.status = user.status;
      contact.lastSeen = user.last_seen;
      scheduleRender();
    }
  } catch {
    // the next presence frame tells
  }
}

function showConnection(state) {
  const banner = $("connection");
  banner.textContent = state === "open" ? "" : state === "connecting" ? "Connecting…" : "Reconnecting…";
  app.classList.toggle("disconnected", state !== "open");
  connected = state === "open";
  scheduleRender();
}

// ---- navigation: the open conversation lives in the URL's fragment

function navigate(key) {
  const hash = key ? `#${encodeURIComponent(contacts.get(key).username)}` : "";
  if (location.hash !== hash) history.pushState(key ? { fromList: true } : null, "", hash || location.pathname);
  route();
}

// The username in the fragment, or "" (a malformed fragment is no one).
function fragmentName() {
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch {
    return "";
  }
}

let routing = 0;

// A link to anyone in the directory opens a conversation with them.
async function route() {
  const attempt = ++routing;
  const name = fragmentName();
  const key = keyOf(name);
  if (!name || key === meKey || !(contacts.has(key) || USERNAME_RE.test(name))) return closeChat();
  if (contacts.has(key)) return openChat(key);
  try {
    const { users } = await api("GET", `/api/users?q=${encodeURIComponent(name)}&limit=1`);
    if (attempt !== routing) return;
    const user = users.find((candidate) => keyOf(candidate.username) === key);
    if (!user) return closeChat();
    applyStatus(contactFor(user.username), user.status, user.last_seen);
    openChat(key);
  } catch (error) {
    if (attempt !== routing) return;
    if (error.status === 401) return goToSignIn();
    closeChat();
  }
}

function openChat(key) {
  if (openKey !== key) {
    const draft = composer.swap(drafts.get(key) ?? "");
    if (openKey) drafts.set(openKey, draft);
    openKey = key;
    showConversation(true);
    const conversation = conversationFor(key);
    conversation.readWhenOpened = conversation.myRead;
    view.open(conversation);
    if (!conversation.loaded) loadLatest(conversation);
    else {
      view.markUnread(firstUnread(conversation));
      view.sync("unread");
    }
    loadBlocks();
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
    if (error.status === 401) goToSignIn();
  }
}

async function signOut() {
  signingOut = true;
  await api("POST", "/api/logout").catch(() => {});
  outbox.clear();
  goTo("/login");
}

async function start() {
  showConnection("connecting");
  setupNotificationButton($("notify"));
  $("sign-out").addEventListener("click", signOut);
  $("new-chat").addEventListener("click", () => $("search").focus());
  $("block").addEventListener("click", () => openKey && setBlock(openKey, !blocks.keys.has(openKey)));
  $("unblock").addEventListener("click", () => openKey && setBlock(openKey, false));
  // Escape closes the open conversation (unless something in it used the key:
  // a menu, a dialog, an edit or a reply, the search box).
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented || !openKey || view.menu.isOpen) return;
    if ($("confirm-delete").open) return;
    event.preventDefault();
    navigate(null);
  });
  $("back").addEventListener("click", () => (history.state?.fromList ? history.back() : navigate(null)));
  window.addEventListener("popstate", route);
  window.addEventListener("focus", scheduleReadCheck);
  document.addEventListener("visibilitychange", scheduleReadCheck);
  setInterval(() => {
    contactList.refreshTimes(contacts.values());
    renderHeader();
  }, TIMES_REFRESH);
  $("sidebar-lists").addEventListener("scroll", loadMoreIfNearEnd, { passive: true });
  contactList.setProblem("Loading your conversations…");
  // The socket first: once hello is here, every event after it arrives live
  // (held until the list is drawn), and the list loaded next has all before it.
  socket.start();
  await Promise.race([stream.hello, new Promise((resolve) => setTimeout(resolve, HELLO_WAIT))]);
  const helloFirst = stream.helloSeen;
  if (!(await loadFirstConversations())) return;
  stream.release();
  route();
  scheduleRender();
  // Loaded without a socket: what happened before it connected comes with a fresh first page.
  if (!helloFirst) stream.hello.then(() => loadConversations(false).catch(() => {}));
}

start();
