// Frames from the server, applied to what the page knows: messages, edits and
// deletes, acknowledgements, typing, reads, presence and errors.
import { keyOf } from "./store.js";
import { notifyMessage } from "./notify.js";
import { stopTyping, updateUnread } from "./roster.js";

const TYPING_SHOWN_FOR = 5000;
const RATE_LIMITED_RETRY = 2000;

// What sends an entry of the outbox: always with its client_id, so the server
// never stores it twice however often it is sent.
export function sendFrame(entry) {
  const frame = { type: "send", to: entry.to, body: entry.body, client_id: entry.client_id };
  if (entry.reply_to) frame.reply_to = entry.reply_to;
  if (entry.attachment) frame.attachment = entry.attachment.id;
  return frame;
}

export class FrameHandler {
  // onHello: the connection is (back) up; onDeleted(id): a message of the open
  // conversation was deleted; onNavigate(key): a notification was clicked.
  constructor(roster, outbox, socket, { onHello, onDeleted, onNavigate, onChange }) {
    Object.assign(this, { roster, outbox, socket });
    this.handlers = { onHello, onDeleted, onNavigate, onChange };
  }

  apply(frame) {
    const handler = {
      hello: (f) => this.#hello(f),
      message: (f) => this.#receive(f.message),
      edit: (f) => this.#change(f),
      delete: (f) => this.#change(f),
      ack: (f) => this.#ack(f),
      typing: (f) => this.#typing(f),
      read: (f) => this.#read(f),
      presence: (f) => this.#presence(f),
      error: (f) => this.#error(f),
    }[frame.type];
    handler?.(frame);
  }

  // hello lists the people of my conversations who are online; the others are
  // offline. (Someone opened from the search is not covered: their status stays.)
  #hello(frame) {
    const online = new Set((frame.presence || []).map((entry) => keyOf(entry.username)));
    for (const contact of this.roster.contacts.values()) {
      if (!contact.listed || online.has(contact.key)) continue;
      if (contact.status === "online") stopTyping(contact);
      contact.status = "offline";
      contact.presenceLive = true;
    }
    for (const entry of frame.presence || []) this.#presence(entry);
    this.handlers.onHello();
    for (const entry of this.outbox.unsent()) this.socket.send(sendFrame(entry));
    this.handlers.onChange("auto");
  }

  #ack(frame) {
    this.outbox.remove(frame.client_id);
    this.#receive(frame.message);
  }

  #receive(message) {
    const { roster, outbox } = this;
    const mine = keyOf(message.from) === roster.meKey;
    const peer = mine ? message.to : message.from;
    if (keyOf(peer) === roster.meKey) return; // notes to self have no place in this interface
    if (mine && message.client_id) outbox.remove(message.client_id);
    const contact = roster.contactFor(peer);
    const conversation = roster.conversationFor(contact.key);
    contact.listed = true; // a first message makes a conversation: it goes to the top of the list
    contact.lastId = Math.max(contact.lastId, message.id);
    if (mine) contact.blockedMe = false; // stored: whatever block there was is gone
    // Counted unless the conversation list already counted it (or it was here already).
    if (conversation.put(message) === "added" && !mine) {
      stopTyping(contact);
      if (message.id > contact.snapshotId && message.id > conversation.myRead && !message.deleted) {
        contact.unread += 1;
        notifyMessage(message, () => this.handlers.onNavigate(contact.key));
      }
    }
    roster.noteLast(contact, conversation.messages.get(message.id));
    this.handlers.onChange(mine ? "bottom" : "auto");
  }

  // An edit or a delete, by either of us: shown wherever the message is.
  #change(frame) {
    const roster = this.roster;
    const message = frame.message;
    const peer = keyOf(message.from) === roster.meKey ? message.to : message.from;
    const conversation = roster.conversations.get(keyOf(peer));
    if (!conversation?.change(message)) return;
    const contact = roster.contacts.get(conversation.key);
    if (contact) roster.noteLast(contact, conversation.messages.get(message.id));
    if (message.deleted && roster.openKey === conversation.key) this.handlers.onDeleted(message.id);
    this.handlers.onChange("auto");
  }

  #typing(frame) {
    const contact = this.roster.contacts.get(keyOf(frame.from));
    if (!contact) return;
    contact.typing = true;
    clearTimeout(contact.typingTimer);
    contact.typingTimer = setTimeout(() => {
      stopTyping(contact);
      this.handlers.onChange();
    }, TYPING_SHOWN_FOR);
    this.handlers.onChange();
  }

  #read(frame) {
    const roster = this.roster;
    if (keyOf(frame.reader) === roster.meKey) {
      const contact = roster.contacts.get(keyOf(frame.with));
      if (!contact) return;
      const conversation = roster.conversationFor(contact.key);
      conversation.myRead = Math.max(conversation.myRead, frame.up_to);
      updateUnread(contact, conversation);
    } else if (keyOf(frame.with) === roster.meKey && roster.contacts.has(keyOf(frame.reader))) {
      const conversation = roster.conversationFor(keyOf(frame.reader));
      conversation.peerRead = Math.max(conversation.peerRead, frame.up_to);
    }
    this.handlers.onChange("auto");
  }

  #presence(frame) {
    if (keyOf(frame.username) === this.roster.meKey) return;
    // Only the people of my conversations (or someone becoming one) have presence.
    const contact = this.roster.contactFor(frame.username);
    // Frames from different server processes can arrive out of order: the later change wins.
    // One with no last_seen is a block starting: offline, and the time seen before is not ours to know.
    if (frame.last_seen && contact.lastSeen && frame.last_seen < contact.lastSeen) return;
    contact.presenceLive = true;
    contact.status = frame.status;
    contact.lastSeen = frame.last_seen;
    if (frame.status === "offline") stopTyping(contact);
    this.handlers.onChange();
  }

  #error(frame) {
    if (!frame.client_id) {
      console.warn("ChatX:", frame.code, frame.detail);
      return;
    }
    if (frame.code === "rate_limited") {
      setTimeout(() => {
        const entry = this.#unsent(frame.client_id);
        if (entry) this.socket.send(sendFrame(entry));
      }, RATE_LIMITED_RETRY);
      return;
    }
    const entry = this.#unsent(frame.client_id);
    if (frame.code === "blocked" && entry) this.roster.contactFor(entry.to).blockedMe = true;
    this.outbox.fail(frame.client_id, frame.code === "blocked" ? `${entry?.to ?? "They"} isn't accepting your messages.` : frame.detail);
    this.handlers.onChange("auto");
  }

  #unsent(clientId) {
    return this.outbox.unsent().find((candidate) => candidate.client_id === clientId);
  }
}
