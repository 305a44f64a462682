// The message box: Enter sends, Shift+Enter starts a new line, a counter shows
// up near the length limit, and typing is announced at most every 3 seconds.

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
    this.#updateCounter();
    return old;
  }

  focus() {
    this.box.focus();
  }

  #typing() {
    const now = Date.now();
    if (now - this.lastTypingAt < TYPING_EVERY) return;
    this.lastTypingAt = now;
    this.handlers.onTyping();
  }

  #send() {
    const body = this.box.value;
    if (!body.trim() || lengthOf(body) > LIMIT) return;
    this.handlers.onSend(body);
    this.box.value = "";
    this.lastTypingAt = 0;
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
