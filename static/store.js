// What the page knows: each conversation's messages (merged by id, so none is
// ever shown twice) and the outbox of messages not yet acknowledged.

export const keyOf = (username) => username.toLowerCase();

// Whether a is a later state of the same message than b: deleted is final,
// and a later edit wins.
function isNewer(a, b) {
  if (Boolean(a.deleted) !== Boolean(b.deleted)) return Boolean(a.deleted);
  return (a.edited_at ?? "") > (b.edited_at ?? "");
}

export class Conversation {
  constructor(peer, meKey, outbox) {
    this.peer = peer;
    this.key = keyOf(peer);
    this.meKey = meKey;
    this.outbox = outbox;
    this.messages = new Map();
    this.changes = new Map(); // id -> edited or deleted state of a message not loaded yet
    this.loaded = false; // the newest page came from the API
    this.hasOlder = true;
    this.loadingOlder = false;
    this.myRead = 0;
    this.peerRead = 0;
    this.sortedCache = null;
  }

  // Adds a message, or a newer state of one already here (edited, deleted).
  // Returns "added", "changed" or null (nothing new).
  put(message) {
    const known = this.messages.get(message.id) ?? this.changes.get(message.id);
    this.changes.delete(message.id);
    const current = known && !isNewer(message, known) ? known : message;
    const had = this.messages.has(message.id);
    if (had && current === this.messages.get(message.id)) return null;
    this.messages.set(message.id, current);
    this.sortedCache = null;
    return had ? "changed" : "added";
  }

  // An edit or delete: applied if the message is here, else kept until it
  // arrives (a page of history asked for before the change can come after it).
  change(message) {
    if (this.messages.has(message.id)) return this.put(message) !== null;
    const known = this.changes.get(message.id);
    if (!known || isNewer(message, known)) this.changes.set(message.id, message);
    return false;
  }

  sorted() {
    this.sortedCache ??= [...this.messages.values()].sort((a, b) => a.id - b.id);
    return this.sortedCache;
  }

  get oldestId() {
    return this.sorted()[0]?.id ?? 0;
  }

  isMine(message) {
    return keyOf(message.from) === this.meKey;
  }

  pending() {
    return this.outbox.to(this.key);
  }

  // Unread messages among those loaded here; exact when the cursor is within them.
  unreadAfter(cursor) {
    return this.sorted().filter((message) => message.id > cursor && !this.isMine(message)).length;
  }
}

export class Outbox {
  constructor(storageKey) {
    this.storageKey = storageKey;
    this.entries = this.#load();
  }

  add(to, body, replyTo = null, attachment = null) {
    const entry = { client_id: crypto.randomUUID(), to, body, reply_to: replyTo, created: new Date().toISOString(),
      error: null, attachment };
    this.entries.push(entry);
    this.#save();
    return entry;
  }

  fail(clientId, detail) {
    const entry = this.entries.find((candidate) => candidate.client_id === clientId);
    if (!entry) return false;
    entry.error = detail;
    this.#save();
    return true;
  }

  // A failed entry sent again: pending until the server answers.
  retry(clientId) {
    const entry = this.entries.find((candidate) => candidate.client_id === clientId);
    if (!entry) return null;
    entry.error = null;
    this.#save();
    return entry;
  }

  remove(clientId) {
    const before = this.entries.length;
    this.entries = this.entries.filter((entry) => entry.client_id !== clientId);
    if (this.entries.length === before) return false;
    this.#save();
    return true;
  }

  to(peerKey) {
    return this.entries.filter((entry) => keyOf(entry.to) === peerKey);
  }

  unsent() {
    return this.entries.filter((entry) => !entry.error);
  }

  clear() {
    this.entries = [];
    localStorage.removeItem(this.storageKey);
  }

  // Kept in localStorage so a reload while offline loses nothing.
  #load() {
    try {
      return JSON.parse(localStorage.getItem(this.storageKey)) || [];
    } catch {
      return [];
    }
  }

  #save() {
    try {
      localStorage.setItem(this.storageKey, JSON.stringify(this.entries));
    } catch {
      // storage full or disabled: the outbox still works for this page
    }
  }
}
