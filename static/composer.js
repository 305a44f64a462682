// The message box: Enter sends, Shift+Enter starts a new line, a counter shows
// up near the length limit, and typing is announced at most every 3 seconds
// (the server passes one a peer every 2 seconds): typing within those 3 seconds
// is announced when they are over, if there is still something in the box.

const LIMIT = 4000;
const COUNTER_FROM = 3500;
const TYPING_EVERY = 3000;

// The server counts characters, not UTF-16 units.
const lengthOf = (text) => [...text].length;

export class Composer {
  constructor(form, { onSend, onTyping }) {
    this.form = form;
    this.box = form.elements.message;
    this.counter = form.querySelector(".counter");
    this.button = form.querySelector("button[type=submit]");
    this.handlers = { onSend, onTyping };
    this.lastTypingAt = 0;
    this.typingTimer = null;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.#send();
    });
    this.box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.#send();
      }
    });
    this.box.addEventListener("input", () => {
      this.#updateCounter();
      if (this.box.value.trim()) this.#typing();
    });
  }

  // Switching conversations: hand back the draft of the old one, show the new one's.
  swap(draft) {
    const old = this.box.value;
    this.box.value = draft;
    this.lastTypingAt = 0;
    clearTimeout(this.typingTimer);
    this.typingTimer = null;
    this.#updateCounter();
    return old;
  }

  focus() {
    this.box.focus();
  }

  #typing() {
    const wait = this.lastTypingAt + TYPING_EVERY - Date.now();
    if (wait <= 0) {
      this.lastTypingAt = Date.now();
      this.handlers.onTyping();
    } else if (this.typingTimer === null) {
      this.typingTimer = setTimeout(() => {
        this.typingTimer = null;
        if (this.box.value.trim()) this.#typing();
      }, wait);
    }
  }

  #send() {
    const body = this.box.value;
    if (!body.trim() || lengthOf(body) > LIMIT) return;
    this.handlers.onSend(body);
    this.box.value = "";
    this.#updateCounter();
    this.box.focus();
  }

  #updateCounter() {
    const length = lengthOf(this.box.value);
    const over = length > LIMIT;
    this.counter.hidden = length < COUNTER_FROM;
    this.counter.textContent = over
      ? `${length - LIMIT} characters over the ${LIMIT} limit`
      : `${LIMIT - length} characters left`;
    this.counter.classList.toggle("over", over);
    this.button.disabled = over;
  }
}
