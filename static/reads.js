// Reading: what of the open conversation is on screen, in a window the person
// is looking at, is marked read; checked a moment after anything moved.
import { updateUnread } from "./roster.js";

const CHECK_AFTER = 100;

export class ReadTracker {
  constructor(roster, view, socket, { onChange }) {
    Object.assign(this, { roster, view, socket });
    this.handlers = { onChange };
    this.queued = false;
    window.addEventListener("focus", () => this.schedule());
    document.addEventListener("visibilitychange", () => this.schedule());
  }

  schedule() {
    if (this.queued) return;
    this.queued = true;
    setTimeout(() => {
      this.queued = false;
      this.#markRead();
    }, CHECK_AFTER);
  }

  // Read means on screen, in a window the person is looking at.
  #markRead() {
    const roster = this.roster;
    if (!roster.openKey || document.visibilityState !== "visible" || !document.hasFocus()) return;
    const contact = roster.openContact;
    const conversation = roster.open;
    if (!conversation.loaded) return; // the page on screen is not the conversation yet
    const id = this.view.newestVisibleFromPeer();
    if (id <= conversation.myRead) return;
    if (!this.socket.send({ type: "read", with: contact.username, up_to: id })) return;
    conversation.myRead = id;
    updateUnread(contact, conversation);
    this.handlers.onChange();
  }
}
