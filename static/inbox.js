// The conversation list comes from GET /api/conversations, newest first, a page
// at a time: the first page before anything else is shown, older ones as the
// list is scrolled near its end.
import { api, goToSignIn } from "./api.js";
import { keyOf } from "./store.js";
import { applyStatus } from "./roster.js";

const PAGE = 50;
const RETRY_MAX = 30000;
const NEAR_END = 200;

export class Inbox {
  constructor(roster, contactList, { scroller, more }, { onChange }) {
    Object.assign(this, { roster, contactList, scroller, more });
    this.handlers = { onChange };
    this.loaded = false;
    this.loading = false;
    this.hasMore = false;
    this.before = null;
    this.retryAt = 0;
  }

  // The first page, or (more) the next older one.
  async load(more) {
    if (this.loading || (more && !this.hasMore)) return;
    this.loading = true;
    this.more.hidden = !more;
    try {
      const query = more ? `?before=${this.before}&limit=${PAGE}` : `?limit=${PAGE}`;
      const page = await api("GET", `/api/conversations${query}`);
      for (const item of page.conversations) this.#apply(item);
      const oldest = page.conversations.at(-1)?.last_message?.id;
      if (more || !this.loaded) {
        this.hasMore = page.has_more;
        if (oldest !== undefined) this.before = oldest;
      }
      this.loaded = true;
    } finally {
      this.loading = false;
      this.more.hidden = true;
    }
    this.handlers.onChange();
  }

  // Until the first page is here, nothing else can be shown: try until it works.
  async loadFirst() {
    for (let delay = 1000; ; delay = Math.min(delay * 2, RETRY_MAX)) {
      try {
        await this.load(false);
        this.contactList.setProblem("");
        return true;
      } catch (error) {
        if (error.status === 401) {
          goToSignIn();
          return false;
        }
        this.contactList.setProblem("Can't load your conversations right now. Trying again…");
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  // Scrolled near the end of the list: the next page of older conversations.
  // (Not while searching: a list narrowed down by name is always short.)
  loadMoreIfNearEnd() {
    const lists = this.scroller;
    if (!this.loaded || !this.hasMore || this.loading || this.contactList.query || Date.now() < this.retryAt) return;
    if (lists.scrollHeight - lists.scrollTop - lists.clientHeight > NEAR_END) return;
    this.load(true).then(() => this.loadMoreIfNearEnd(), () => {
      this.retryAt = Date.now() + RETRY_MAX / 6;
    });
  }

  // One item of the list. Its `unread` counts every message up to its
  // last_message; messages newer than that are counted as they arrive.
  #apply(item) {
    const roster = this.roster;
    if (keyOf(item.user.username) === roster.meKey) return; // notes to self have no place in this interface
    const contact = roster.contactFor(item.user.username);
    const conversation = roster.conversationFor(contact.key);
    const last = item.last_message;
    contact.listed = true;
    applyStatus(contact, item.status, item.last_seen);
    if (last) {
      if (last.id >= contact.lastId) contact.unread = item.unread;
      contact.snapshotId = Math.max(contact.snapshotId, last.id);
      contact.lastId = Math.max(contact.lastId, last.id);
      conversation.put(last);
      roster.noteLast(contact, conversation.messages.get(last.id));
    }
    roster.mergeReads(conversation, item.read_up_to);
    if (conversation.myRead >= contact.lastId) contact.unread = 0;
  }
}
