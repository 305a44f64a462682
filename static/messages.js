// The message log of the open conversation. Nodes are kept by key and only
// added, moved or removed, so the live region announces only what is new and
// focus and selection survive updates.
import { el, hidden } from "./dom.js";
import { clockTime, dayKey, dayLabel } from "./timefmt.js";

const NEAR_TOP = 300;
const NEAR_BOTTOM = 48;
const URL_RE = /\bhttps?:\/\/[^\s<>"]+/gi;
const TRAILING_PUNCTUATION = /[.,!?;:'")\]]+$/;

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
      el("a", { href: url, text: url, target: "_blank", rel: "noopener noreferrer" }));
    last = match.index + url.length;
  }
  paragraph.append(text.slice(last));
}

export class MessageView {
  constructor(log, jump, { onNearTop, onScrolled, onDiscard }) {
    this.log = log;
    this.jump = jump;
    this.nodes = new Map();
    this.theirs = []; // [{id, node}] in id order, for read tracking
    this.conversation = null;
    this.onDiscard = onDiscard;
    log.addEventListener("scroll", () => {
      if (log.scrollTop < NEAR_TOP) onNearTop();
      if (this.#atBottom()) jump.hidden = true;
      onScrolled();
    });
    jump.addEventListener("click", () => {
      this.scrollToBottom();
      log.focus();
    });
  }

  open(conversation) {
    this.conversation = conversation;
    this.log.replaceChildren();
    this.nodes.clear();
    this.jump.hidden = true;
    this.sync("bottom");
  }

  // mode: "bottom" scrolls to the newest message, "prepend" keeps what the
  // reader is looking at in place, "auto" follows new messages only when the
  // reader was already at the bottom.
  sync(mode = "auto") {
    const log = this.log;
    const wasAtBottom = this.#atBottom();
    const oldHeight = log.scrollHeight;
    const oldTop = log.scrollTop;
    const added = this.#reconcile(this.#items());
    if (mode === "bottom" || (mode === "auto" && wasAtBottom)) this.scrollToBottom();
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
    let day = null;
    const push = (item, iso) => {
      if (dayKey(iso) !== day) {
        day = dayKey(iso);
        items.push({ key: `d:${day}`, make: () => el("p", { class: "day", text: dayLabel(iso) }) });
      }
      items.push(item);
    };
    if (conversation.loadingOlder) {
      items.push({ key: "loading", make: () => el("p", { class: "log-note", text: "Loading earlier messages…" }) });
    } else if (conversation.loaded && !conversation.hasOlder) {
      items.push({ key: "start", make: () => el("p", { class: "log-note" }) ,
        update: (node) => { node.textContent = this.#startNote(); } });
    }
    for (const message of conversation.sorted()) {
      const mine = conversation.isMine(message);
      const key = mine && message.client_id ? `c:${message.client_id}` : `m:${message.id}`;
      push({ key, message, mine, make: () => this.#makeMessage(), update: (node) => this.#fillMessage(node, message, mine) },
        message.sent_at);
    }
    for (const entry of conversation.pending()) {
      push({ key: `c:${entry.client_id}`, make: () => this.#makeMessage(), update: (node) => this.#fillPending(node, entry) },
        entry.created);
    }
    return items;
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
      body: el("p", { class: "body" }),
      time: el("time"),
      tick: el("span", { class: "tick", "aria-hidden": "true" }),
      edited: el("span", { class: "edited", text: "edited", hidden: true }),
      tickLabel: hidden(""),
      discard: el("button", { type: "button", class: "link-button", text: "Discard", hidden: true }),
    };
    const node = el("div", { class: "msg" }, parts.sender, parts.body,
      el("span", { class: "meta" }, parts.edited, parts.time, parts.tick, parts.tickLabel, parts.discard));
    node.parts = parts;
    return node;
  }

  #fillMessage(node, message, mine) {
    const state = !mine ? null : message.id <= this.conversation.peerRead ? "read" : "sent";
    this.#fill(node, { body: message.body, iso: message.sent_at, mine, state, deleted: message.deleted });
    node.dataset.id = message.id;
    const { edited } = node.parts;
    edited.hidden = !message.edited_at || Boolean(message.deleted);
    edited.title = message.edited_at ? `Edited ${new Date(message.edited_at).toLocaleString()}` : "";
  }

  #fillPending(node, entry) {
    this.#fill(node, { body: entry.body, iso: entry.created, mine: true, state: entry.error ? "failed" : "pending" });
    const { discard } = node.parts;
    discard.hidden = !entry.error;
    discard.onclick = () => this.onDiscard(entry.client_id);
    if (entry.error) node.parts.tickLabel.textContent = `Not sent: ${entry.error}`;
  }

  // The text is only rebuilt when it changed (an edit or a delete), so a
  // selection in it survives ticks and times being updated.
  #fill(node, { body, iso, mine, state, deleted = false }) {
    const { sender, body: paragraph, time, tick, tickLabel, discard } = node.parts;
    sender.textContent = mine ? "You: " : `${this.conversation.peer}: `;
    if (node.shown?.body !== body || node.shown?.deleted !== deleted) {
      node.shown = { body, deleted };
      paragraph.replaceChildren();
      paragraph.classList.toggle("deleted", deleted);
      if (deleted) paragraph.textContent = "message deleted";
      else fillBody(paragraph, body);
    }
    node.className = `msg ${mine ? "mine" : "theirs"}`;
    if (state) node.classList.add(state);
    node.dataset.state = state || "";
    time.dateTime = iso;
    time.textContent = clockTime(iso);
    time.title = new Date(iso).toLocaleString();
    tick.textContent = state ? TICKS[state][0] : "";
    tickLabel.textContent = state ? TICKS[state][1] : "";
    tickLabel.className = state === "pending" || state === "failed" ? "tick-note" : "visually-hidden";
    discard.hidden = true;
  }
}
