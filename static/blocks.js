// Blocking, from the conversation header: the people I block (keys, from GET
// /api/blocks the first time a conversation opens), the Block/Unblock button
// (a block asks first, saying what it does) and the banner saying who blocked
// whom.
import { api, goToSignIn } from "./api.js";
import { keyOf } from "./store.js";
import { stopTyping } from "./roster.js";

export class Blocks {
  // form: the composer's, hidden while blocked. focusComposer: after an
  // unblock, focus goes back to the message box.
  // confirm: the dialog that asks before a block.
  constructor(roster, { button, notice, text, unblock, form, confirm }, { onChange, focusComposer }) {
    Object.assign(this, { roster, button, notice, text, unblock, form, confirm });
    this.handlers = { onChange, focusComposer };
    this.keys = new Set();
    this.loaded = null; // null, "loading" or true
    button.addEventListener("click", () => {
      const key = roster.openKey;
      if (!key) return;
      if (this.has(key)) this.set(key, false);
      else this.#confirmBlock(key);
    });
    unblock.addEventListener("click", () => roster.openKey && this.set(roster.openKey, false));
  }

  has(key) {
    return this.keys.has(key);
  }

  render(contact, blocked) {
    const { button, notice, text, unblock } = this;
    button.hidden = this.loaded !== true;
    button.textContent = blocked ? "Unblock" : "Block";
    button.setAttribute("aria-label", `${blocked ? "Unblock" : "Block"} ${contact.username}`);
    const says = blocked
      ? `You blocked ${contact.username}. They can't send you messages, and neither of you sees the other online.`
      : contact.blockedMe ? `${contact.username} isn't accepting messages from you.` : "";
    notice.hidden = !says;
    notice.classList.toggle("banner", blocked);
    if (text.textContent !== says) text.textContent = says;
    unblock.hidden = !blocked;
    unblock.setAttribute("aria-label", `Unblock ${contact.username}`);
    this.form.hidden = blocked || !this.roster.openKey;
  }

  #confirmBlock(key) {
    const { confirm } = this;
    const contact = this.roster.contacts.get(key);
    confirm.querySelector("h2").textContent = `Block ${contact.username}?`;
    confirm.returnValue = "";
    confirm.onclose = () => {
      if (confirm.returnValue === "block" && this.roster.openKey === key) this.set(key, true);
      else this.button.focus();
    };
    confirm.showModal();
  }

  async load() {
    if (this.loaded) return;
    this.loaded = "loading";
    try {
      const page = await api("GET", "/api/blocks");
      for (const user of page.blocks) this.keys.add(keyOf(user.username));
      this.loaded = true;
    } catch (error) {
      this.loaded = null; // tried again when a conversation opens
      if (error.status === 401) goToSignIn();
    }
    this.handlers.onChange();
  }

  async set(key, block) {
    const contact = this.roster.contacts.get(key);
    const button = this.button;
    button.disabled = true;
    try {
      await api(block ? "PUT" : "DELETE", `/api/blocks/${encodeURIComponent(contact.username)}`);
      // The socket's presence frames tell the rest: offline with no time when a
      // block starts, the presence as it is now when it ends.
      if (block) {
        this.keys.add(key);
        stopTyping(contact);
        contact.status = "offline"; // no presence either way while the block lasts
        contact.lastSeen = null;
      } else {
        this.keys.delete(key);
      }
    } catch (error) {
      if (error.status === 401) goToSignIn();
    } finally {
      button.disabled = false;
    }
    this.handlers.onChange();
    if (this.roster.openKey === key) {
      if (block) this.unblock.focus();
      else this.handlers.focusComposer();
    }
  }
}
