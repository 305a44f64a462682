// Searching the directory: what is typed in the search box is looked up by
// name prefix (a moment after typing stops), and the people found are listed
// under "People"; choosing one opens a conversation with them.
import { api } from "./api.js";
import { el, fillAvatar } from "./dom.js";
import { keyOf } from "./store.js";
import { lastSeen } from "./timefmt.js";

const DEBOUNCE = 250;
const PAGE = 20;
const MAX_QUERY = 32;
const NAME_CHARS = /^[A-Za-z0-9_.-]+$/;

// Someone in the directory by exact name (any case), or undefined.
export async function findUser(username) {
  const { users } = await api("GET", `/api/users?q=${encodeURIComponent(username)}&limit=1`);
  return users.find((candidate) => keyOf(candidate.username) === keyOf(username));
}

export class PeopleSearch {
  constructor({ input, section, list, note, more }, { onQuery, onChoose }) {
    Object.assign(this, { input, section, list, note, more });
    this.handlers = { onQuery, onChoose };
    this.query = "";
    this.users = [];
    this.hasMore = false;
    this.timer = null;
    this.request = 0; // answers to an older query are dropped
    input.addEventListener("input", () => this.#changed());
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && input.value) {
        event.preventDefault();
        event.stopPropagation(); // clears the search, does not close the conversation
        this.clear();
      } else if (event.key === "Enter" && this.users.length) {
        event.preventDefault();
        this.#choose(this.users[0]);
      } else if (event.key === "ArrowDown" && this.users.length) {
        event.preventDefault();
        this.#focusResult(0);
      }
    });
    // Up and down move through the people found; Escape goes back to the box.
    list.addEventListener("keydown", (event) => {
      const buttons = [...list.querySelectorAll("button")];
      const index = buttons.indexOf(document.activeElement);
      if (index < 0) return;
      const moves = { ArrowDown: index + 1, ArrowUp: index - 1, Home: 0, End: buttons.length - 1 };
      if (event.key in moves) {
        event.preventDefault();
        if (moves[event.key] < 0) input.focus();
        else this.#focusResult(Math.min(moves[event.key], buttons.length - 1));
      } else if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        input.focus();
      }
    });
    more.addEventListener("click", () => this.#search(true));
  }

  clear() {
    this.input.value = "";
    this.#changed();
  }

  #changed() {
    const query = this.input.value.trim();
    this.handlers.onQuery(query);
    if (query === this.query) return;
    this.query = query;
    clearTimeout(this.timer);
    this.request += 1;
    this.users = [];
    this.hasMore = false;
    this.section.hidden = query === "";
    if (!query) return this.#render("");
    // No username has other characters, or more of them: no need to ask.
    if (query.length > MAX_QUERY || !NAME_CHARS.test(query)) return this.#render(this.#none());
    this.#render("Searching…");
    this.timer = setTimeout(() => this.#search(false), DEBOUNCE);
  }

  async #search(more) {
    const request = ++this.request;
    const after = more && this.users.length ? `&after=${encodeURIComponent(this.users.at(-1).username)}` : "";
    this.more.disabled = true;
    try {
      const page = await api("GET", `/api/users?q=${encodeURIComponent(this.query)}&limit=${PAGE}${after}`);
      if (request !== this.request) return;
      this.users = more ? [...this.users, ...page.users] : page.users;
      this.hasMore = page.has_more;
      this.#render(this.users.length ? "" : this.#none());
    } catch (error) {
      if (request !== this.request) return;
      this.#render(error.status === 401 ? "Your session has ended. Sign in again." : "Search failed. Try again.");
    } finally {
      if (request === this.request) this.more.disabled = false;
    }
  }

  #focusResult(index) {
    this.list.querySelectorAll("button")[index]?.focus();
  }

  #none() {
    return `No one matches “${this.query}”.`;
  }

  #render(noteText) {
    this.list.replaceChildren(...this.users.map((user) => this.#item(user)));
    this.note.textContent = noteText;
    this.note.hidden = !noteText;
    this.more.hidden = !this.hasMore;
  }

  #item(user) {
    const online = user.status === "online";
    const avatar = el("span", { "aria-hidden": "true" });
    fillAvatar(avatar, user.username);
    const presence = el("span", { class: `presence${online ? " online" : ""}` },
      el("span", { class: "dot", "aria-hidden": "true" }),
      el("span", { class: `presence-label${online ? "" : " visually-hidden"}`, text: online ? "online" : "offline" }));
    // No status: not my partner, or a block between us; nothing to tell.
    const detail = el("span", { class: "detail", text: online || !user.status ? "" : lastSeen(user.last_seen) });
    const button = el("button", { type: "button", class: "contact" },
      avatar,
      el("span", { class: "who" }, el("span", { class: "name", text: user.username }),
        el("span", { class: "status-line" }, presence, detail)));
    button.addEventListener("click", () => this.#choose(user));
    return el("li", { "data-key": keyOf(user.username) }, button);
  }

  #choose(user) {
    this.handlers.onChoose(user);
  }
}
