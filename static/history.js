// The open conversation's history from the API: the newest page when it first
// opens (shown at the first unread message), older pages as it is scrolled up
// or a quote asks for its original.
import { api, goToSignIn } from "./api.js";

const PAGE = 50;
const MAX_PAGES_FOR_QUOTE = 20;

function messagesPath(conversation, query) {
  return `/api/conversations/${encodeURIComponent(conversation.peer)}/messages?${query}`;
}

// The first message from the peer that was unread when the conversation was opened.
function firstUnread(conversation) {
  const cursor = conversation.readWhenOpened ?? conversation.myRead;
  return conversation.sorted().find((message) => message.id > cursor
    && !conversation.isMine(message) && !message.deleted)?.id ?? null;
}

export class HistoryLoader {
  constructor(roster, view, { onChange }) {
    this.roster = roster;
    this.view = view;
    this.handlers = { onChange };
  }

  // A conversation just opened: shown from where I stopped reading.
  open(conversation) {
    conversation.readWhenOpened = conversation.myRead;
    this.view.open(conversation);
    if (!conversation.loaded) this.loadLatest(conversation);
    else this.#showUnread(conversation);
  }

  // The connection is back: the open conversation's first page, if it never came.
  retry() {
    const open = this.roster.open;
    if (open && !open.loaded) this.loadLatest(open);
  }

  async loadLatest(conversation) {
    const view = this.view;
    view.setBusy(true);
    try {
      const page = await api("GET", messagesPath(conversation, `limit=${PAGE}`));
      this.#merge(conversation, page);
      conversation.loaded = true;
      conversation.hasOlder = page.has_more;
    } catch (error) {
      if (error.status === 401) goToSignIn();
      return; // tried again when the connection is back
    } finally {
      view.setBusy(false);
    }
    if (this.roster.openKey !== conversation.key) return;
    this.#showUnread(conversation);
    this.#fillViewport(conversation);
    this.handlers.onChange();
  }

  async loadOlder(conversation) {
    if (!conversation || !conversation.loaded || !conversation.hasOlder || conversation.loadingOlder) return;
    const view = this.view;
    conversation.loadingOlder = true;
    view.setBusy(true);
    view.sync("prepend");
    try {
      const page = await api("GET", messagesPath(conversation, `before=${conversation.oldestId}&limit=${PAGE}`));
      this.#merge(conversation, page);
      conversation.hasOlder = page.has_more;
    } catch {
      // the next scroll to the top tries again
    } finally {
      conversation.loadingOlder = false;
      view.setBusy(false);
    }
    if (this.roster.openKey !== conversation.key) return;
    view.sync("prepend");
    this.#fillViewport(conversation);
  }

  // A click on a quote: the original, loading older pages until it is there.
  async showOriginal(id) {
    const conversation = this.roster.open;
    for (let pages = 0; conversation && !this.view.showMessage(id); pages += 1) {
      if (pages >= MAX_PAGES_FOR_QUOTE || !conversation.hasOlder || conversation.oldestId <= id) return;
      await this.loadOlder(conversation);
      if (this.roster.openKey !== conversation.key) return;
    }
  }

  // Opened at the first unread message, under an "Unread messages" divider.
  #showUnread(conversation) {
    this.view.markUnread(firstUnread(conversation));
    this.view.sync("unread");
  }

  // A first page shorter than the screen could never be scrolled up.
  #fillViewport(conversation) {
    if (conversation.hasOlder && this.view.needsMore) this.loadOlder(conversation);
  }

  #merge(conversation, page) {
    const roster = this.roster;
    const contact = roster.contacts.get(conversation.key);
    for (const message of page.messages) {
      conversation.put(message);
      contact.lastId = Math.max(contact.lastId, message.id);
    }
    const newest = conversation.sorted().at(-1);
    if (newest) roster.noteLast(contact, newest);
    // History with someone found by search or a link: that is a conversation.
    if (page.messages.length) contact.listed = true;
    roster.mergeReads(conversation, page.read_up_to);
  }
}
