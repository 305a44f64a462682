// Navigation: the open conversation lives in the URL's fragment (`#username`),
// so a link to anyone in the directory opens a conversation with them, and the
// back button closes it again.
import { USERNAME_RE, goToSignIn } from "./api.js";
import { keyOf } from "./store.js";
import { findUser } from "./people.js";
import { applyStatus } from "./roster.js";

// The username in the fragment, or "" (a malformed fragment is no one).
function fragmentName() {
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch {
    return "";
  }
}

export class Router {
  // onOpen(conversation): one was just opened; onClosed(key): the one closed,
  // once it is (for focus to go back to it in the list).
  constructor(roster, composer, { app, placeholder, head, logWrap, form, typing }, { onOpen, onClosed, onChange }) {
    Object.assign(this, { roster, composer, app, placeholder, typing });
    this.panes = [head, logWrap, form];
    this.handlers = { onOpen, onClosed, onChange };
    this.drafts = new Map();
    this.routing = 0;
  }

  navigate(key) {
    const hash = key ? `#${encodeURIComponent(this.roster.contacts.get(key).username)}` : "";
    if (location.hash !== hash) history.pushState(key ? { fromList: true } : null, "", hash || location.pathname);
    this.route();
  }

  // The back button in the header: back to the list the conversation was opened from.
  back() {
    if (history.state?.fromList) history.back();
    else this.navigate(null);
  }

  // Opens the conversation the fragment names, looking the name up if it is new here.
  async route() {
    const attempt = ++this.routing;
    const { roster } = this;
    const name = fragmentName();
    const key = keyOf(name);
    if (!name || key === roster.meKey || !(roster.contacts.has(key) || USERNAME_RE.test(name))) return this.#close();
    if (roster.contacts.has(key)) return this.#open(key);
    try {
      const user = await findUser(name);
      if (attempt !== this.routing) return;
      if (!user) return this.#close();
      applyStatus(roster.contactFor(user.username), user.status, user.last_seen);
      this.#open(key);
    } catch (error) {
      if (attempt !== this.routing) return;
      if (error.status === 401) return goToSignIn();
      this.#close();
    }
  }

  #open(key) {
    const { roster, composer } = this;
    if (roster.openKey !== key) {
      const draft = composer.swap(this.drafts.get(key) ?? "");
      if (roster.openKey) this.drafts.set(roster.openKey, draft);
      roster.openKey = key;
      this.#show(true);
      this.handlers.onOpen(roster.conversationFor(key));
    }
    this.app.dataset.view = "conversation";
    composer.focus();
    this.handlers.onChange();
  }

  #close() {
    const { roster } = this;
    const previous = roster.openKey;
    if (roster.openKey) this.drafts.set(roster.openKey, this.composer.swap(""));
    roster.openKey = null;
    this.app.dataset.view = "contacts";
    this.#show(false);
    this.handlers.onChange();
    if (previous) setTimeout(() => this.handlers.onClosed(previous), 0);
  }

  #show(shown) {
    this.placeholder.hidden = shown;
    for (const pane of this.panes) pane.hidden = !shown;
    if (!shown) this.typing.textContent = "";
  }
}
