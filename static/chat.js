// The chat page: creates what keeps contacts and conversations in step with the
// server and the views that draw them, and wires them together.
import { socketUrl } from "./api.js";
import { ReconnectingSocket } from "./socket.js";
import { Stream } from "./stream.js";
import { Outbox, keyOf } from "./store.js";
import { Roster, applyStatus } from "./roster.js";
import { Inbox } from "./inbox.js";
import { HistoryLoader } from "./history.js";
import { FrameHandler, sendFrame } from "./frames.js";
import { ReadTracker } from "./reads.js";
import { Blocks } from "./blocks.js";
import { Router } from "./routes.js";
import { ConnectionStatus } from "./connection.js";
import { Session } from "./session.js";
import { AccountDialog } from "./account.js";
import { ContactList } from "./contacts.js";
import { PeopleSearch } from "./people.js";
import { MessageView, snippet } from "./messages.js";
import { Composer } from "./composer.js";
import { AttachmentPicker } from "./attachments.js";
import { fillAvatar } from "./dom.js";
import { lastSeen } from "./timefmt.js";
import { setupNotificationButton, showUnreadInTitle } from "./notify.js";

const HELLO_WAIT = 5000;
const TIMES_REFRESH = 30000;

const $ = (id) => document.getElementById(id);
const meKey = keyOf(document.body.dataset.username);
const outbox = new Outbox(`chatx.outbox.${meKey}`);
const roster = new Roster(meKey, outbox);
const session = new Session(outbox);
new AccountDialog(session, $("account"));
fillAvatar($("me-avatar"), document.body.dataset.username);

const app = $("app");
const contactList = new ContactList($("contacts"), $("contacts-empty"), (key) => router.navigate(key));
const search = new PeopleSearch(
  { input: $("search"), section: $("people-section"), list: $("people"), note: $("people-note"), more: $("people-more") },
  { onQuery: (query) => contactList.setFilter(query), onChoose: chooseFromSearch },
);
const view = new MessageView($("log"), $("jump"), {
  onNearTop: () => loader.loadOlder(roster.open),
  onScrolled: () => reads.schedule(),
  onDiscard: (clientId) => {
    outbox.remove(clientId);
    view.sync();
  },
  onRetry: (clientId) => {
    const entry = outbox.retry(clientId);
    if (entry) socket.send(sendFrame(entry));
    view.sync("bottom");
  },
  onReply: (message) => {
    const name = roster.open.isMine(message) ? "yourself" : message.from;
    composer.startReply(message, name, snippet(message));
  },
  onEdit: (message) => composer.startEdit(message),
  onDelete: confirmDelete,
  onQuote: (id) => loader.showOriginal(id),
});
const composer = new Composer($("composer"), {
  onSend: send,
  onTyping: sendTyping,
  onEdit: (id, body) => socket.send({ type: "edit", id, body }),
  lastEditable,
});
new AttachmentPicker(
  { button: $("attach"), input: $("attach-file"), tray: $("attach-tray"), dropZone: $("conversation"),
    pasteTarget: $("message") },
  { canAttach: () => roster.open?.peer ?? null, onSend: sendAttachment },
);
const stream = new Stream((frame) => frames.apply(frame));
const connection = new ConnectionStatus($("connection"), app, { onChange: scheduleRender });
const socket = new ReconnectingSocket(() => socketUrl(stream.seq), {
  onFrame: (frame) => stream.receive(frame),
  onState: (state) => connection.show(state),
  onSignedOut: () => session.ended(),
  onRefused: () => session.check(),
});
const frames = new FrameHandler(roster, outbox, socket, {
  onHello: () => loader.retry(),
  onDeleted: (id) => composer.forget(id),
  onNavigate: (key) => router.navigate(key),
  onChange: scheduleRender,
});
const reads = new ReadTracker(roster, view, socket, { onChange: scheduleRender });
const loader = new HistoryLoader(roster, view, { onChange: scheduleRender });
const inbox = new Inbox(roster, contactList, { scroller: $("sidebar-lists"), more: $("contacts-more") },
  { onChange: scheduleRender });
const blocks = new Blocks(roster,
  { button: $("block"), notice: $("block-notice"), text: $("block-text"), unblock: $("unblock"), form: $("composer"),
    confirm: $("confirm-block") },
  { onChange: scheduleRender, focusComposer: () => composer.focus() });
const router = new Router(roster, composer,
  { app, placeholder: $("placeholder"), head: $("conversation-head"), logWrap: $("log-wrap"), form: $("composer"),
    typing: $("typing") },
  {
    onOpen: (conversation) => {
      loader.open(conversation);
      blocks.load();
    },
    onClosed: (key) => contactList.focus(key),
    onChange: scheduleRender,
  });

function chooseFromSearch(user) {
  const contact = roster.contactFor(user.username);
  applyStatus(contact, user.status, user.last_seen);
  search.clear();
  router.navigate(contact.key);
}

// ↑ in an empty message box: my last message that can still be edited.
function lastEditable() {
  const conversation = roster.open;
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

// ---- what this page sends

// Shown as pending at once; sent now or as soon as the connection is back,
// always with the same client_id, so the server never stores it twice.
function send(body, replyTo) {
  const conversation = roster.open;
  if (!conversation) return;
  socket.send(sendFrame(outbox.add(conversation.peer, body, replyTo)));
  view.markUnread(null); // answering: what was unread has been seen
  view.sync("bottom");
}

function sendAttachment(peer, caption, attachment) {
  socket.send(sendFrame(outbox.add(peer, caption, null, attachment)));
  view.sync("bottom");
}

function sendTyping() {
  if (roster.openKey) socket.send({ type: "typing", to: roster.openContact.username });
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
    contactList.render(roster.listed(), roster.openKey, connection.connected);
    showUnreadInTitle(roster.unreadTotal());
    renderHeader();
    if (logMode && roster.openKey) view.sync(logMode);
    logMode = null;
    reads.schedule();
    inbox.loadMoreIfNearEnd(); // a first page that does not fill the list could never be scrolled
  }, 0);
}

function renderHeader() {
  const contact = roster.openContact;
  if (!contact) return;
  const connected = connection.connected;
  $("peer-name").textContent = contact.username;
  fillAvatar($("peer-avatar"), contact.username);
  const status = $("peer-status");
  const blocked = blocks.has(contact.key);
  // While the connection is down nobody's presence is known; with no time
  // (a block, or not a partner yet) only "offline" is.
  status.textContent = blocked ? "blocked" : !connected ? "waiting for the connection…"
    : contact.status === "online" ? "online" : contact.lastSeen ? lastSeen(contact.lastSeen) : "offline";
  status.classList.toggle("online", connected && !blocked && contact.status === "online");
  $("typing").textContent = contact.typing && connected ? `${contact.username} is typing…` : "";
  blocks.render(contact, blocked);
}

async function start() {
  connection.show("connecting");
  setupNotificationButton($("notify"));
  $("sign-out").addEventListener("click", () => session.signOut());
  $("new-chat").addEventListener("click", () => $("search").focus());
  // Escape closes the open conversation (unless something in it used the key:
  // a menu, a dialog, an edit or a reply, the search box).
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented || !roster.openKey || view.menu.isOpen) return;
    if (document.querySelector("dialog[open]")) return; // the dialog closes, not the conversation
    event.preventDefault();
    router.navigate(null);
  });
  $("back").addEventListener("click", () => router.back());
  window.addEventListener("popstate", () => router.route());
  setInterval(() => {
    contactList.refreshTimes(roster.contacts.values());
    renderHeader();
  }, TIMES_REFRESH);
  $("sidebar-lists").addEventListener("scroll", () => inbox.loadMoreIfNearEnd(), { passive: true });
  contactList.setProblem("Loading your conversations…");
  // The socket first: once hello is here, every event after it arrives live
  // (held until the list is drawn), and the list loaded next has all before it.
  socket.start();
  await Promise.race([stream.hello, new Promise((resolve) => setTimeout(resolve, HELLO_WAIT))]);
  const helloFirst = stream.helloSeen;
  if (!(await inbox.loadFirst())) return;
  stream.release();
  router.route();
  scheduleRender();
  // Loaded without a socket: what happened before it connected comes with a fresh first page.
  if (!helloFirst) stream.hello.then(() => inbox.load(false).catch(() => {}));
}

start();
