// The message box: Enter sends, Shift+Enter starts a new line, a counter shows
// up near the length limit, and typing is announced at most every 3 seconds
// (the server passes one a peer every 2 seconds): typing within those 3 seconds
// is announced when they are over, if there is still something in the box.
//
// The box also edits a message of mine (↑ in an empty box takes the last one)
// and writes a reply, with a bar above it saying which; Escape cancels either.

const LIMIT = 4000;
const COUNTER_FROM = 3500;
const TYPING_EVERY = 3000;

const segmenter = "Segmenter" in Intl ? new Intl.Segmenter(undefined, { granularity: "grapheme" }) : null;

// What a person counts as characters: grapheme clusters (a family emoji is one).
export function graphemes(text) {
  return segmenter ? [...segmenter.segment(text)].map((part) => part.segment) : [...text];
}

// The server counts code points; a message must stay within LIMIT of those.
const codePoints = (text) => [...text].length;

// How the text stands against the limit, in characters as people see them:
// {left} while it fits, else {over}: how many of its last characters must go.
export function measure(text) {
  const parts = graphemes(text);
  let points = codePoints(text);
  if (points <= LIMIT) return { count: parts.length, left: Math.max(0, LIMIT - parts.length), over: 0 };
  let over = 0;
  while (points > LIMIT) {
    points -= codePoints(parts[parts.length - 1 - over]);
    over += 1;
  }
  return { count: parts.length, left: 0, over };
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

export class Composer {
  constructor(form, { onSend, onTyping, onEdit, lastEditable }) {
    this.form = form;
    this.box = form.elements.message;
    this.counter = form.querySelector(".counter");
    this.button = form.querySelector("button[type=submit]");
    this.bar = form.querySelector(".composing");
    this.barTitle = form.querySelector("#composing-title");
    this.barQuote = form.querySelector("#composing-quote");
    this.handlers = { onSend, onTyping, onEdit, lastEditable };
    this.mode = null; // null, {kind: "reply", id}, or {kind: "edit", id, draft}
    this.lastTypingAt = 0;
    this.typingTimer = null;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.#send();
    });
    form.querySelector("#composing-cancel").addEventListener("click", () => {
      this.cancelMode();
      this.box.focus();
    });
    this.box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.#send();
      } else if (event.key === "Escape" && this.mode) {
        event.preventDefault();
        event.stopPropagation(); // cancels the edit or reply, not the conversation
        this.cancelMode();
      } else if (event.key === "ArrowUp" && !this.box.value && !this.mode && !event.isComposing) {
        const message = this.handlers.lastEditable();
        if (message) {
          event.preventDefault();
          this.startEdit(message);
        }
      }
    });
    this.box.addEventListener("input", () => {
      this.#updateCounter();
      if (this.box.value.trim() && this.mode?.kind !== "edit") this.#typing();
    });
  }

  // Switching conversations: hand back the draft of the old one, show the new one's.
  swap(draft) {
    const old = this.mode?.kind === "edit" ? this.mode.draft : this.box.value;
    this.#setMode(null);
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

  startReply(message, name, quote) {
    if (this.mode?.kind === "edit") this.cancelMode();
    this.#setMode({ kind: "reply", id: message.id }, `Reply to ${name}`, quote);
    this.box.focus();
  }

  startEdit(message) {
    const draft = this.mode?.kind === "edit" ? this.mode.draft : this.box.value;
    this.#setMode({ kind: "edit", id: message.id, draft, original: message.body }, "Edit message", "");
    this.box.value = message.body;
    this.#updateCounter();
    this.box.focus();
    this.box.setSelectionRange(this.box.value.length, this.box.value.length);
  }

  cancelMode() {
    if (this.mode?.kind === "edit") {
      this.box.value = this.mode.draft;
      this.#updateCounter();
    }
    this.#setMode(null);
  }

  // The message being edited or replied to is gone (deleted): stop.
  forget(id) {
    if (this.mode?.id === id) this.cancelMode();
  }

  #setMode(mode, title = "", quote = "") {
    this.mode = mode;
    this.bar.hidden = !mode;
    this.barTitle.textContent = title;
    this.barQuote.textContent = quote;
    this.form.classList.toggle("editing", mode?.kind === "edit");
    this.button.textContent = mode?.kind === "edit" ? "Save" : "Send";
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
    if (!body.trim() || measure(body).over) return;
    if (this.mode?.kind === "edit") {
      const { id, draft, original } = this.mode;
      if (body !== original && !this.handlers.onEdit(id, body)) return; // not connected: the box keeps the edit
      this.#setMode(null);
      this.box.value = draft;
    } else {
      this.handlers.onSend(body, this.mode?.kind === "reply" ? this.mode.id : null);
      this.#setMode(null);
      this.box.value = "";
    }
    this.#updateCounter();
    this.box.focus();
  }

  #updateCounter() {
    const { count, left, over } = measure(this.box.value);
    this.counter.hidden = count < COUNTER_FROM && !over;
    this.counter.textContent = over
      ? `${plural(over, "character")} over the ${LIMIT} limit`
      : `${plural(left, "character")} left`;
    this.counter.classList.toggle("over", over > 0);
    this.button.disabled = over > 0;
  }
}
