// A photo at full size over the page: a modal dialog that Escape, its Close
// button or a click beside the photo closes, giving focus back to what opened it.
import { el } from "./dom.js";

export class Lightbox {
  constructor() {
    this.image = el("img", { class: "lightbox-image", alt: "" });
    this.caption = el("p", { class: "lightbox-caption", dir: "auto" });
    this.close = el("button", { type: "button", class: "ghost lightbox-close", text: "Close" });
    this.download = el("a", { class: "ghost lightbox-download", text: "Download" });
    this.dialog = el("dialog", { class: "lightbox", "aria-label": "Photo" },
      el("div", { class: "lightbox-bar" }, this.caption, this.download, this.close), this.image);
    this.opener = null;
    this.close.addEventListener("click", () => this.dialog.close());
    this.dialog.addEventListener("click", (event) => {
      if (event.target === this.dialog) this.dialog.close();
    });
    this.dialog.addEventListener("close", () => {
      this.image.removeAttribute("src");
      this.opener?.focus();
      this.opener = null;
    });
    document.body.append(this.dialog);
  }

  // Escape must close this, not the conversation under it.
  get isOpen() {
    return this.dialog.open;
  }

  show(attachment, url, opener) {
    this.opener = opener;
    this.image.alt = attachment.name;
    if (attachment.width && attachment.height) {
      this.image.width = attachment.width;
      this.image.height = attachment.height;
    }
    this.image.src = url;
    this.caption.textContent = attachment.name;
    this.download.href = url;
    this.download.download = attachment.name;
    this.dialog.setAttribute("aria-label", attachment.name);
    this.dialog.showModal();
    this.close.focus();
  }
}
