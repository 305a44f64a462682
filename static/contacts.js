// The contacts list: one button per conversation, most recent first. The
// search box narrows it down by name as well as searching the directory.
import { el, hidden, fillAvatar } from "./dom.js";
import { lastSeen } from "./timefmt.js";

function byRecency(a, b) {
  return b.lastId - a.lastId || a.key.localeCompare(b.key);
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

  render(contacts, activeKey) {
    const focusedKey = this.list.contains(document.activeElement)
      ? document.activeElement.closest("li").dataset.key : null;
    const sorted = [...contacts].sort(byRecency);
    sorted.forEach((contact, index) => {
      const item = this.items.get(contact.key) || this.#create(contact);
      this.#update(item, contact, contact.key === activeKey);
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

  // "last seen 5 min ago" goes stale by itself.
  refreshTimes(contacts) {
    for (const contact of contacts) {
      const item = this.items.get(contact.key);
      if (item) this.#updateDetail(item, contact);
    }
  }

  #create(contact) {
    const item = {
      avatar: el("span", { "aria-hidden": "true" }),
      name: el("span", { class: "name", text: contact.username }),
      label: el("span", { class: "presence-label" }),
      detail: el("span", { class: "detail" }),
      count: el("span"),
    };
    fillAvatar(item.avatar, contact.username);
    item.presence = el("span", { class: "presence" }, el("span", { class: "dot", "aria-hidden": "true" }), item.label);
    item.badge = el("span", { class: "badge" }, item.count, hidden(" unread"));
    item.button = el("button", { type: "button", class: "contact" },
      item.avatar,
      el("span", { class: "who" }, item.name, el("span", { class: "status-line" }, item.presence, item.detail)),
      item.badge);
    item.button.addEventListener("click", () => this.onChoose(contact.key));
    item.li = el("li", { "data-key": contact.key }, item.button);
    this.items.set(contact.key, item);
    return item;
  }

  #update(item, contact, active) {
    item.li.classList.toggle("active", active);
    if (active) item.button.setAttribute("aria-current", "true");
    else item.button.removeAttribute("aria-current");
    item.presence.classList.toggle("online", contact.status === "online");
    item.label.textContent = contact.status;
    this.#updateDetail(item, contact);
    item.badge.hidden = contact.unread === 0;
    item.count.textContent = contact.unread > 99 ? "99+" : String(contact.unread);
  }

  // The accessible presence text is always exactly "online" or "offline";
  // what is shown beside the dot says more.
  #updateDetail(item, contact) {
    const online = contact.status === "online";
    item.label.classList.toggle("visually-hidden", !online || contact.typing);
    item.detail.textContent = contact.typing ? "typing…" : online ? "" : lastSeen(contact.lastSeen);
    item.detail.classList.toggle("typing-now", contact.typing);
  }

  // While searching, the People results below say whether anyone matches.
  #applyFilter() {
    const query = this.query;
    for (const [key, item] of this.items) item.li.hidden = !key.includes(query);
    this.emptyNote.textContent = this.problem || "No conversations yet. Search people by name to start one.";
    this.emptyNote.hidden = !this.problem && (this.items.size > 0 || query !== "");
  }
}
