// The menu of a message (Reply, Edit, Delete): one menu for the page, opened
// under the button that asked for it (or under the message pressed long or
// right-clicked). Arrow keys move between its items, Escape closes it and
// gives focus back to the button.
import { el } from "./dom.js";

export class MessageMenu {
  constructor() {
    this.node = el("div", { class: "menu", role: "menu", hidden: true });
    this.button = null;
    document.body.append(this.node);
    this.node.addEventListener("keydown", (event) => this.#key(event));
    document.addEventListener("pointerdown", (event) => {
      if (this.button && !this.node.contains(event.target) && event.target !== this.button
          && !this.button.contains(event.target)) this.close(false);
    });
    window.addEventListener("resize", () => this.close(false));
  }

  get isOpen() {
    return this.button !== null;
  }

  // choices: [[label, action], …]; anchor: what the menu opens under.
  open(button, choices, anchor = button) {
    if (this.button === button) return this.close(true);
    this.close(false);
    this.button = button;
    this.node.replaceChildren(...choices.map(([label, action]) => {
      const item = el("button", { type: "button", role: "menuitem", tabIndex: -1, text: label });
      item.addEventListener("click", () => {
        this.close(false);
        action();
      });
      return item;
    }));
    this.node.setAttribute("aria-label", button.getAttribute("aria-label") || "Message");
    button.setAttribute("aria-expanded", "true");
    this.node.hidden = false;
    // Under the button, or over it when there is no room below; inside the window.
    const at = anchor.getBoundingClientRect();
    const { offsetWidth: width, offsetHeight: height } = this.node;
    const below = at.bottom + 4 + height <= window.innerHeight;
    this.node.style.top = `${below ? at.bottom + 4 : Math.max(4, at.top - 4 - height)}px`;
    this.node.style.left = `${Math.min(Math.max(4, at.right - width), window.innerWidth - width - 4)}px`;
    this.node.firstChild?.focus();
  }

  // refocus: give focus back to the button the menu came from.
  close(refocus) {
    if (!this.button) return;
    const button = this.button;
    this.button = null;
    button.setAttribute("aria-expanded", "false");
    this.node.hidden = true;
    if (refocus && button.isConnected) button.focus();
  }

  #key(event) {
    const items = [...this.node.children];
    const index = items.indexOf(document.activeElement);
    const moves = { ArrowDown: index + 1, ArrowUp: index - 1, Home: 0, End: items.length - 1 };
    if (event.key in moves) {
      event.preventDefault();
      items[(moves[event.key] + items.length) % items.length].focus();
    } else if (event.key === "Escape" || event.key === "Tab") {
      if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
      }
      this.close(event.key === "Escape");
    }
  }
}
