// The contacts list: one button per conversation, most recent first, with the
// last message and its time. The search box narrows it down by name as well as
// searching the directory.
import { el, hidden, fillAvatar } from "./dom.js";
import { lastSeen, listTime } from "./timefmt.js";
import { attachmentLabel } from "./attachments.js";

function byRecency(a, b) {
  return b.lastId - a.lastId || a.key.localeCompare(b.key);
}

// What the list says about the last message: "You: …" for mine.
export function previewOf(message, mine) {
  if (!message) return { who: "", text: "", deleted: false };
  if (message.deleted) return { who: mine ? "You: " : "", text: "message deleted", deleted: true };
  const text = message.body.replace(/\s+/g, " ").trim() || (message.attachment ? attachmentLabel(message.attachment) : "");
  return { who: mine ? "You: " : "", text: [...text].slice(0, 120).join(""), deleted: false };
}

export class ContactList {
  constructor(list, emptyNote, onChoose) {
    this.list = list;
    this.emptyNote = emptyNote;
    this.items = new Map();
    this.onChoose = onChoose;
    this.query = "";
    this.problem = "";
  }

  setFilter(query) {
    this.query = query.trim().toLowerCase();
    this.#applyFilter();
  }

  // Why the list may be incomplete ("" once it loaded).
  setProblem(text) {
    this.problem = text;
    this.#applyFilter();
  }

  // `connected`: whether presence is known at all (it is not while the socket is down).
  render(contacts, activeKey, connected) {
    const focusedKey = this.list.contains(document.activeElement)
      ? document.activeElement.closest("li").dataset.key : null;
    const sorted = [...contacts].sort(byRecency);
    sorted.forEach((contact, index) => {
      const item = this.items.get(contact.key) || this.#create(contact);
      this.#update(item, contact, contact.key === activeKey, connected);
      if (this.list.children[index] !== item.li) {
        this.list.insertBefore(item.li, this.list.children[index] || null);
      }
    });
    if (focusedKey && !this.list.contains(document.activeElement)) this.focus(focusedKey);
    this.#applyFilter();
  }

  focus(key) {
    this.items.get(key)?.button.focus();
  }

  // "Yesterday" goes stale by itself.
  refreshTimes(contacts) {
    for (const contact of contacts) {
      const item = this.items.get(contact.key);
      if (!item) continue;
      if (contact.last) item.time.textContent = listTime(contact.last.sent_at);
      if (item.button.title) item.button.title = lastSeen(contact.lastSeen);
    }
  }

  #create(contact) {
    const item = {
      avatar: el("span", { "aria-hidden": "true" }),
      dot: el("span", { class: "dot", "aria-hidden": "true" }),
      label: el("span", { class: "visually-hidden" }),
      name: el("span", { class: "name", text: contact.username }),
      time: el("time", { class: "when" }),
      who: el("span", { class: "preview-who" }),
      text: el("span", { class: "preview-text", dir: "auto" }),
      count: el("span"),
    };
    fillAvatar(item.avatar, contact.username);
    item.presence = el("span", { class: "presence" }, item.dot, item.label);
    item.preview = el("span", { class: "preview" }, item.who, item.text);
    item.badge = el("span", { class: "badge" }, item.count, hidden(" unread"));
    item.button = el("button", { type: "button", class: "contact" },
      el("span", { class: "avatar-wrap" }, item.avatar, item.presence),
      el("span", { class: "who" },
        el("span", { class: "line" }, item.name, item.time),
        el("span", { class: "line" }, item.preview, item.badge)));
    item.button.addEventListener("click", () => this.onChoose(contact.key));
    item.li = el("li", { "data-key": contact.key }, item.button);
    this.items.set(contact.key, item);
    return item;
  }

  #update(item, contact, active, connected) {
    item.li.classList.toggle("active", active);
    if (active) item.button.setAttribute("aria-current", "true");
    else item.button.removeAttribute("aria-current");
    // The accessible presence text is exactly "online" or "offline" while it
    // is known; while the connection is down nobody's is.
    const status = connected ? contact.status : "unknown";
    item.presence.className = `presence ${status}`;
    item.label.textContent = connected ? status : "presence unknown";
    item.button.title = status === "offline" && contact.lastSeen ? lastSeen(contact.lastSeen) : "";
    const { who, text, deleted } = contact.typing
      ? { who: "", text: "typing…", deleted: false } : previewOf(contact.last, contact.lastMine);
    item.preview.classList.toggle("typing-now", contact.typing);
    item.preview.classList.toggle("deleted", deleted);
    item.who.textContent = who;
    if (item.text.textContent !== text) item.text.textContent = text;
    if (contact.last) {
      item.time.dateTime = contact.last.sent_at;
      item.time.textContent = listTime(contact.last.sent_at);
    }
    item.badge.hidden = contact.unread === 0;
    item.count.textContent = contact.unread > 99 ? "99+" : String(contact.unread);
  }

  // While searching, the People results below say whether anyone matches.
  #applyFilter() {
    const query = this.query;
    for (const [key, item] of this.items) item.li.hidden = !key.includes(query);
    this.emptyNote.textContent = this.problem || "No conversations yet. Choose New chat to find someone.";
    this.emptyNote.hidden = !this.problem && (this.items.size > 0 || query !== "");
  }
}
