// The message log of the open conversation. Nodes are kept by key and only
// added, moved or removed, so the live region announces only what is new and
// focus and selection survive updates.
//
// Consecutive messages of one person within a few minutes form a group that
// shows one time, under its last message. Days are separated, and the first
// message that was unread when the conversation was opened has an "Unread
// messages" divider above it. A message that failed to send keeps its place in
// time, with Retry and Discard. The menu of a message opens from its "⋯"
// button (on touch screens there only for the keyboard), a long press, a right
// click, or Shift+F10 on the message.
import { el, hidden } from "./dom.js";
import { clockTime, dayKey, dayLabel } from "./timefmt.js";
import { MessageMenu } from "./menu.js";
import { attachmentLabel, fillAttachment } from "./attachments.js";

const NEAR_TOP = 300;
const NEAR_BOTTOM = 48;
const GROUP_GAP = 5 * 60 * 1000;
// A link ends at white space, markup characters and bidirectional controls:
// none of those is ever part of a link's address or text.
const URL_RE = /\bhttps?:\/\/[^\s<>"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]+/gi;
const TRAILING_PUNCTUATION = /[.,!?;:'")\]]+$/;
const QUOTE_LENGTH = 90;
const FLASH_FOR = 1600;
const LONG_PRESS = 500;
const PRESS_SLOP = 10;

const TICKS = {
  pending: ["", "Sending…"],
  sent: ["✓", "Sent"],
  read: ["✓✓", "Read"],
  failed: ["!", "Not sent"],
};

function fillBody(paragraph, text) {
  let last = 0;
  for (const match of text.matchAll(URL_RE)) {
    const url = match[0].replace(TRAILING_PUNCTUATION, "");
    paragraph.append(text.slice(last, match.index),
      el("a", { href: url, text: url, dir: "ltr", target: "_blank", rel: "noopener noreferrer" }));
    last = match.index + url.length;
  }
  paragraph.append(text.slice(last));
}

export function snippet(message) {
  if (!message) return "Earlier message";
  if (message.deleted) return "message deleted";
  const text = message.body.replace(/\s+/g, " ").trim() || (message.attachment ? attachmentLabel(message.attachment) : "");
  const chars = [...text];
  return chars.length > QUOTE_LENGTH ? `${chars.slice(0, QUOTE_LENGTH).join("")}…` : text;
}

export class MessageView {
  constructor(log, jump, { onNearTop, onScrolled, onDiscard, onRetry, onReply, onEdit, onDelete, onQuote }) {
    this.log = log;
    this.jump = jump;
    this.nodes = new Map();
    this.theirs = []; // [{id, node}] in id order, for read tracking
    this.conversation = null;
    this.unreadFrom = null; // id of the first message unread when the conversation was opened
    this.handlers = { onDiscard, onRetry, onReply, onEdit, onDelete, onQuote };
    this.menu = new MessageMenu();
    log.addEventListener("scroll", () => {
      if (log.scrollTop < NEAR_TOP) onNearTop();
      if (this.#atBottom()) jump.hidden = true;
      this.menu.close(false);
      onScrolled();
    });
    jump.addEventListener("click", () => {
      this.scrollToBottom();
      log.focus();
    });
  }

  open(conversation) {
    this.conversation = conversation;
    this.unreadFrom = null;
    this.menu.close(false);
    this.log.replaceChildren();
    this.nodes.clear();
    this.jump.hidden = true;
    this.sync("bottom");
  }

  // The divider goes above this message (null: no divider).
  markUnread(id) {
    this.unreadFrom = id;
  }

  // mode: "bottom" scrolls to the newest message, "unread" to the unread
  // divider (or the bottom when there is none), "prepend" keeps what the
  // reader is looking at in place, "auto" follows new messages only when the
  // reader was already at the bottom.
  sync(mode = "auto") {
    const log = this.log;
    const wasAtBottom = this.#atBottom();
    const oldHeight = log.scrollHeight;
    const oldTop = log.scrollTop;
    const added = this.#reconcile(this.#items());
    const divider = this.nodes.get("unread");
    if (mode === "unread" && divider) {
      log.scrollTop = Math.max(0, divider.offsetTop - log.offsetTop - 16);
      if (!this.#atBottom()) this.jump.hidden = false;
    } else if (mode === "bottom" || mode === "unread" || (mode === "auto" && wasAtBottom)) this.scrollToBottom();
    else if (mode === "prepend") log.scrollTop = oldTop + (log.scrollHeight - oldHeight);
    else if (added) this.jump.hidden = false;
  }

  setBusy(busy) {
    this.log.setAttribute("aria-busy", String(busy));
  }

  scrollToBottom() {
    this.log.scrollTop = this.log.scrollHeight;
    this.jump.hidden = true;
  }

  // Brings a message into view and flashes it; false when it is not loaded.
  showMessage(id) {
    const node = this.log.querySelector(`.msg[data-id="${Number(id)}"]`);
    if (!node) return false;
    node.scrollIntoView({ block: "center" });
    node.classList.remove("flash");
    void node.offsetWidth; // restart the animation
    node.classList.add("flash");
    node.dataset.flashing = "true";
    clearTimeout(node.flashTimer);
    node.flashTimer = setTimeout(() => {
      node.classList.remove("flash");
      delete node.dataset.flashing;
    }, FLASH_FOR);
    node.focus({ preventScroll: true });
    return true;
  }

  get needsMore() {
    return this.log.scrollHeight <= this.log.clientHeight + NEAR_TOP;
  }

  // The newest message from the peer that is on screen right now, or 0.
  newestVisibleFromPeer() {
    const top = this.log.scrollTop;
    const bottom = top + this.log.clientHeight;
    for (let i = this.theirs.length - 1; i >= 0; i -= 1) {
      const { id, node } = this.theirs[i];
      if (node.offsetTop + node.offsetHeight <= top) return 0;
      if (node.offsetTop < bottom && node.offsetHeight > 0) return id;
    }
    return 0;
  }

  #atBottom() {
    const log = this.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < NEAR_BOTTOM;
  }

  #items() {
    const conversation = this.conversation;
    const items = [];
    if (conversation.loadingOlder) {
      items.push({ key: "loading", make: () => el("p", { class: "log-note", text: "Loading earlier messages…" }) });
    } else if (conversation.loaded && !conversation.hasOlder) {
      items.push({ key: "start", make: () => el("p", { class: "log-note" }),
        update: (node) => { node.textContent = this.#startNote(); } });
    }
    // Messages and pending ones in order, each with what its neighbours need.
    const entries = [];
    for (const message of conversation.sorted()) {
      const mine = conversation.isMine(message);
      entries.push({ key: mine && message.client_id ? `c:${message.client_id}` : `m:${message.id}`,
        message, mine, iso: message.sent_at });
    }
    // Those being sent go last; a failed one where it was written, among the
    // messages sent before and after it.
    for (const entry of conversation.pending()) {
      const item = { key: `c:${entry.client_id}`, pending: entry, mine: true, iso: entry.created };
      const later = entry.error ? entries.findIndex((other) => other.iso > entry.created) : -1;
      if (later === -1) entries.push(item);
      else entries.splice(later, 0, item);
    }
    let day = null;
    entries.forEach((entry, index) => {
      const unread = entry.message && entry.message.id === this.unreadFrom;
      if (dayKey(entry.iso) !== day) {
        day = dayKey(entry.iso);
        const { iso } = entry;
        items.push({ key: `d:${day}`, make: () => el("p", { class: "day", role: "separator", text: dayLabel(iso) }) });
      } else if (!unread && this.#joins(entries[index - 1], entry)) {
        entry.continues = true;
      }
      if (unread) {
        items.push({ key: "unread", make: () => el("p", { class: "unread-divider", role: "separator" },
          el("span", { text: "Unread messages" })) });
      }
      const next = entries[index + 1];
      entry.grouped = Boolean(next) && next.message?.id !== this.unreadFrom && dayKey(next.iso) === day
        && this.#joins(entry, next);
      items.push({ key: entry.key, message: entry.message, mine: entry.mine, make: () => this.#makeMessage(),
        update: (node) => (entry.pending ? this.#fillPending(node, entry) : this.#fillMessage(node, entry)) });
    });
    return items;
  }

  // Whether b goes in the same group as the message before it, a.
  #joins(a, b) {
    return a.mine === b.mine && new Date(b.iso) - new Date(a.iso) < GROUP_GAP;
  }

  #startNote() {
    const conversation = this.conversation;
    return conversation.messages.size || conversation.pending().length
      ? `This is the beginning of your conversation with ${conversation.peer}.`
      : `No messages yet. Say hello to ${conversation.peer}!`;
  }

  #reconcile(items) {
    const wanted = new Set(items.map((item) => item.key));
    for (const [key, node] of this.nodes) {
      if (!wanted.has(key)) {
        if (node.contains(document.activeElement)) this.log.focus({ preventScroll: true });
        node.remove();
        this.nodes.delete(key);
      }
    }
    let added = 0;
    let cursor = this.log.firstChild;
    this.theirs = [];
    for (const item of items) {
      let node = this.nodes.get(item.key);
      if (!node) {
        node = item.make();
        this.nodes.set(item.key, node);
        added += 1;
      }
      item.update?.(node);
      if (item.message && !item.mine) this.theirs.push({ id: item.message.id, node });
      if (node === cursor) cursor = cursor.nextSibling;
      else this.log.insertBefore(node, cursor);
    }
    return added;
  }

  #makeMessage() {
    const parts = {
      sender: hidden(""),
      quote: el("button", { type: "button", class: "quote", hidden: true }),
      quoteName: el("span", { class: "quote-name" }),
      quoteText: el("span", { class: "quote-text", dir: "auto" }),
      media: el("div", { class: "media", hidden: true }),
      body: el("p", { class: "body", dir: "auto" }),
      time: el("time"),
      tick: el("span", { class: "tick", "aria-hidden": "true" }),
      edited: el("span", { class: "edited", text: "edited", hidden: true }),
      tickLabel: hidden(""),
      retry: el("button", { type: "button", class: "link-button", text: "Retry", hidden: true }),
      discard: el("button", { type: "button", class: "link-button", text: "Discard", hidden: true }),
      actions: el("button", { type: "button", class: "msg-actions", "aria-haspopup": "menu",
        "aria-expanded": "false", "aria-label": "Message actions", hidden: true },
      el("span", { "aria-hidden": "true", text: "⋯" })),
    };
    parts.quote.append(hidden("In reply to "), parts.quoteName, hidden(": "), parts.quoteText);
    const node = el("div", { class: "msg", tabIndex: -1 }, parts.sender, parts.quote, parts.media, parts.body,
      el("span", { class: "meta" }, parts.edited, parts.time, parts.tick, parts.tickLabel, parts.retry, parts.discard),
      parts.actions);
    parts.quote.addEventListener("click", () => node.replyTo && this.handlers.onQuote(node.replyTo));
    parts.actions.addEventListener("click", () => node.message && this.#openMenu(node));
    node.addEventListener("contextmenu", (event) => {
      if (!node.message || node.message.deleted || event.target.closest("a")) return;
      event.preventDefault();
      if (this.menu.button !== parts.actions) this.#openMenu(node, node);
    });
    node.addEventListener("keydown", (event) => {
      if (event.target === node && node.message && !node.message.deleted
          && (event.key === "ContextMenu" || (event.key === "F10" && event.shiftKey))) {
        event.preventDefault();
        this.#openMenu(node, node);
      }
    });
    this.#pressLong(node);
    node.parts = parts;
    return node;
  }

  // A touch held still on a message opens its menu, as messengers do; the
  // touch ending then is no tap (no click, no focus taken from the menu).
  #pressLong(node) {
    let press = null;
    let opened = false;
    const cancel = () => {
      clearTimeout(press?.timer);
      press = null;
    };
    node.addEventListener("pointerdown", (event) => {
      opened = false;
      if (event.pointerType !== "touch" || !node.message || node.message.deleted) return;
      cancel();
      press = { x: event.clientX, y: event.clientY,
        timer: setTimeout(() => {
          press = null;
          opened = true;
          if (this.menu.button !== node.parts.actions) this.#openMenu(node, node);
        }, LONG_PRESS) };
    });
    node.addEventListener("touchend", (event) => {
      if (opened && event.cancelable) event.preventDefault();
      opened = false;
    });
    node.addEventListener("pointermove", (event) => {
      if (press && Math.hypot(event.clientX - press.x, event.clientY - press.y) > PRESS_SLOP) cancel();
    });
    for (const kind of ["pointerup", "pointercancel", "pointerleave"]) node.addEventListener(kind, cancel);
  }

  #openMenu(node, anchor = node.parts.actions) {
    const { message } = node;
    const mine = this.conversation.isMine(message);
    const choices = [["Reply", () => this.handlers.onReply(message)]];
    // Text cannot be selected on a touch screen: the menu copies it.
    if (navigator.clipboard && !message.deleted) {
      choices.push(["Copy", () => navigator.clipboard.writeText(message.body).catch(() => {})]);
    }
    if (mine && !message.deleted) {
      choices.push(["Edit", () => this.handlers.onEdit(message)], ["Delete", () => this.handlers.onDelete(message)]);
    }
    this.menu.open(node.parts.actions, choices, anchor);
  }

  #fillMessage(node, entry) {
    const { message, mine } = entry;
    const state = !mine ? null : message.id <= this.conversation.peerRead ? "read" : "sent";
    node.message = message;
    this.#fill(node, entry, { body: message.body, state, deleted: message.deleted });
    fillAttachment(node.parts.media, message.deleted ? null : message.attachment);
    node.dataset.id = message.id;
    const { edited, actions } = node.parts;
    edited.hidden = !message.edited_at || Boolean(message.deleted);
    edited.title = message.edited_at ? `Edited ${new Date(message.edited_at).toLocaleString()}` : "";
    actions.hidden = Boolean(message.deleted);
    actions.setAttribute("aria-label", `Actions for ${mine ? "your" : `${this.conversation.peer}’s`} message`);
    this.#fillQuote(node, message.reply_to);
  }

  #fillPending(node, entry) {
    const { pending } = entry;
    node.message = null;
    this.#fill(node, entry, { body: pending.body, state: pending.error ? "failed" : "pending" });
    fillAttachment(node.parts.media, pending.attachment ?? null);
    const { retry, discard, actions } = node.parts;
    actions.hidden = true;
    retry.hidden = discard.hidden = !pending.error;
    retry.onclick = () => this.handlers.onRetry(pending.client_id);
    discard.onclick = () => this.handlers.onDiscard(pending.client_id);
    if (pending.error) node.parts.tickLabel.textContent = `Not sent: ${pending.error}`;
    this.#fillQuote(node, pending.reply_to ?? null);
  }

  #fillQuote(node, replyTo) {
    const { quote, quoteName, quoteText } = node.parts;
    node.replyTo = replyTo;
    quote.hidden = !replyTo;
    if (!replyTo) return;
    const original = this.conversation.messages.get(replyTo);
    quoteName.textContent = !original ? "Reply" : this.conversation.isMine(original) ? "You" : original.from;
    quoteText.textContent = snippet(original);
    quote.classList.toggle("deleted", Boolean(original?.deleted));
    quote.title = "Show the original message";
  }

  // The text is only rebuilt when it changed (an edit or a delete), so a
  // selection in it survives ticks and times being updated.
  #fill(node, entry, { body, state, deleted = false }) {
    const { mine, iso } = entry;
    const { sender, body: paragraph, time, tick, tickLabel, retry, discard } = node.parts;
    sender.textContent = mine ? "You: " : `${this.conversation.peer}: `;
    if (node.shown?.body !== body || node.shown?.deleted !== deleted) {
      node.shown = { body, deleted };
      paragraph.replaceChildren();
      paragraph.classList.toggle("deleted", deleted);
      if (deleted) paragraph.textContent = "message deleted";
      else fillBody(paragraph, body);
      paragraph.hidden = !body && !deleted; // a photo or file alone
    }
    node.className = `msg ${mine ? "mine" : "theirs"}`;
    if (state) node.classList.add(state);
    // One time per group, under its last message (still read out for each).
    if (entry.continues) node.classList.add("continues");
    if (entry.grouped) node.classList.add("grouped");
    if (node.dataset.flashing) node.classList.add("flash");
    node.dataset.state = state || "";
    time.dateTime = iso;
    time.textContent = clockTime(iso);
    time.title = new Date(iso).toLocaleString();
    time.className = entry.grouped ? "visually-hidden" : "";
    tick.textContent = state ? TICKS[state][0] : "";
    tickLabel.textContent = state ? TICKS[state][1] : "";
    tickLabel.className = state === "pending" || state === "failed" ? "tick-note" : "visually-hidden";
    retry.hidden = discard.hidden = true;
  }
}
