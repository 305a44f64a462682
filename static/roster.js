// Everyone this page knows of: the people of my conversations (`listed`, shown
// in the contact list) and anyone opened from the search or a link, with the
// conversation this page holds with each of them, and which one is open.
import { Conversation, keyOf } from "./store.js";

export class Roster {
  constructor(meKey, outbox) {
    this.meKey = meKey;
    this.outbox = outbox;
    this.contacts = new Map(); // key -> {key, username, status, lastSeen, unread, lastId, typing, listed, ...}
    this.conversations = new Map(); // key -> Conversation
    this.openKey = null;
  }

  contactFor(username) {
    const key = keyOf(username);
    if (!this.contacts.has(key)) {
      this.contacts.set(key, {
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
    return this.contacts.get(key);
  }

  conversationFor(key) {
    if (!this.conversations.has(key)) {
      this.conversations.set(key, new Conversation(this.contacts.get(key).username, this.meKey, this.outbox));
    }
    return this.conversations.get(key);
  }

  // The open conversation and its contact (undefined while none is open).
  get open() {
    return this.conversations.get(this.openKey);
  }

  get openContact() {
    return this.contacts.get(this.openKey);
  }

  listed() {
    return [...this.contacts.values()].filter((contact) => contact.listed);
  }

  unreadTotal() {
    return [...this.contacts.values()].reduce((sum, contact) => sum + contact.unread, 0);
  }

  // The newest message of a conversation (or a newer state of it) for its preview.
  // (The conversation keeps the latest state of each message: pass what it holds.)
  noteLast(contact, message) {
    if (!message || (contact.last && message.id < contact.last.id)) return;
    contact.last = message;
    contact.lastMine = keyOf(message.from) === this.meKey;
  }

  mergeReads(conversation, readUpTo) {
    for (const [username, upTo] of Object.entries(readUpTo || {})) {
      if (keyOf(username) === this.meKey) conversation.myRead = Math.max(conversation.myRead, upTo);
      else conversation.peerRead = Math.max(conversation.peerRead, upTo);
    }
  }
}

// A status from HTTP (conversation list, search, a link): kept unless the socket said more.
// The directory says null for someone whose presence I do not see: offline, with no time.
export function applyStatus(contact, status, lastSeenAt) {
  if (contact.presenceLive) return;
  contact.status = status ?? "offline";
  contact.lastSeen = lastSeenAt;
}

export function stopTyping(contact) {
  contact.typing = false;
  clearTimeout(contact.typingTimer);
}

export function updateUnread(contact, conversation) {
  if (conversation.myRead >= contact.lastId) contact.unread = 0;
  else if (conversation.loaded) contact.unread = conversation.unreadAfter(conversation.myRead);
}
