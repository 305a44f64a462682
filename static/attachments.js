// Attachments: choosing a file (the Attach button, dropping it on the
// conversation, pasting an image), a preview with a caption before it goes,
// the upload with its progress bar, cancel and retry; and how an attachment
// shows in the log: a photo as a thumbnail whose place is kept while it loads
// (opening full size in the lightbox), any other file as a card to download.
import { el, hidden } from "./dom.js";
import { Lightbox } from "./lightbox.js";

const base = document.body.dataset.base || "";
const THUMBNAIL_MAX = 320; // the server's thumbnails are at most this on the long side
const PHOTO_TYPES = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]);

export function attachmentUrl(attachment, thumbnail = false) {
  return `${base}/api/attachments/${encodeURIComponent(attachment.id)}${thumbnail ? "/thumbnail" : ""}`;
}

export function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KB", "MB", "GB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

const isPhoto = (attachment) => PHOTO_TYPES.has(attachment.type) && attachment.width > 0 && attachment.height > 0;

// What a message with no text says in the contact list and in reply quotes.
export function attachmentLabel(attachment) {
  return isPhoto(attachment) ? "📷 Photo" : `📎 ${attachment.name}`;
}

function thumbnailSize({ width, height }) {
  const scale = Math.min(1, THUMBNAIL_MAX / Math.max(width, height));
  return { width: Math.max(1, Math.round(width * scale)), height: Math.max(1, Math.round(height * scale)) };
}

let lightbox = null;

export function lightboxOpen() {
  return Boolean(lightbox?.isOpen);
}

function fileCard(attachment, href) {
  const props = { class: "file-card" };
  if (href) Object.assign(props, { href, download: attachment.name });
  return el(href ? "a" : "div", props, el("span", { class: "file-icon", "aria-hidden": "true", text: "📄" }),
    el("span", { class: "file-text" }, el("span", { class: "file-name", dir: "auto", text: attachment.name }),
      hidden(", "), el("span", { class: "file-size", text: formatSize(attachment.size) })));
}

// The attachment of a message in its box; rebuilt only when it changes, so an
// image loads once and keeps its place (its width and height are known before it loads).
export function fillAttachment(box, attachment) {
  const key = attachment?.id ?? "";
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.hidden = !attachment;
  if (!attachment) {
    box.replaceChildren();
    return;
  }
  if (!isPhoto(attachment)) {
    box.replaceChildren(fileCard(attachment, attachmentUrl(attachment)));
    return;
  }
  const { width, height } = thumbnailSize(attachment);
  const image = el("img", { alt: attachment.name, width, height, decoding: "async",
    src: attachmentUrl(attachment, true) });
  const button = el("button", { type: "button", class: "photo", title: "Open full size" }, image);
  button.addEventListener("click", () => {
    lightbox ??= new Lightbox();
    lightbox.show(attachment, attachmentUrl(attachment), button);
  });
  box.replaceChildren(button);
}

// The file chosen for the open conversation, its caption and its upload.
export class AttachmentPicker {
  // canAttach(): the peer a file would go to now, or null; onSend(peer, caption, attachment) sends the message.
  constructor({ button, input, tray, dropZone, pasteTarget }, { canAttach, onSend }) {
    Object.assign(this, { input, tray, dropZone, box: pasteTarget });
    this.handlers = { canAttach, onSend };
    this.file = null;
    this.peer = null;
    this.request = null;
    this.previewUrl = null;
    button.addEventListener("click", () => input.click());
    input.addEventListener("change", () => {
      if (input.files[0]) this.choose(input.files[0]);
      input.value = "";
    });
    dropZone.addEventListener("dragover", (event) => {
      if (!event.dataTransfer?.types.includes("Files") || !canAttach()) return;
      event.preventDefault();
      dropZone.classList.add("dropping");
    });
    dropZone.addEventListener("dragleave", (event) => {
      if (!dropZone.contains(event.relatedTarget)) dropZone.classList.remove("dropping");
    });
    dropZone.addEventListener("drop", (event) => {
      dropZone.classList.remove("dropping");
      const file = event.dataTransfer?.files[0];
      if (!file || !canAttach()) return;
      event.preventDefault();
      this.choose(file);
    });
    pasteTarget.addEventListener("paste", (event) => {
      const file = [...(event.clipboardData?.files ?? [])].find((candidate) => candidate.type.startsWith("image/"));
      if (!file || !canAttach()) return;
      event.preventDefault();
      this.choose(file);
    });
    this.#build();
  }

  #build() {
    this.preview = el("div", { class: "tray-preview" });
    this.caption = el("input", { type: "text", class: "tray-caption", placeholder: "Add a caption…",
      "aria-label": "Caption", dir: "auto", maxLength: 4000 });
    this.progress = el("progress", { class: "tray-progress", max: 100, value: 0, hidden: true });
    this.status = el("p", { class: "tray-status", role: "status" });
    this.sendButton = el("button", { type: "button", class: "primary", text: "Send attachment" });
    this.retryButton = el("button", { type: "button", class: "ghost", text: "Retry", hidden: true });
    this.cancelButton = el("button", { type: "button", class: "ghost", text: "Remove attachment" });
    this.tray.replaceChildren(this.preview, el("div", { class: "tray-side" }, this.caption, this.progress,
      this.status, el("div", { class: "tray-actions" }, this.sendButton, this.retryButton, this.cancelButton)));
    this.sendButton.addEventListener("click", () => this.upload());
    this.retryButton.addEventListener("click", () => this.upload());
    this.cancelButton.addEventListener("click", () => this.clear());
    this.caption.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.isComposing) {
        event.preventDefault();
        if (!this.request) this.upload();
      } else if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        this.clear();
      }
    });
  }

  choose(file) {
    this.clear();
    this.peer = this.handlers.canAttach();
    if (!this.peer) return;
    this.file = file;
    const name = file.name || "pasted image.png";
    const photo = PHOTO_TYPES.has(file.type);
    this.previewUrl = photo ? URL.createObjectURL(file) : null;
    this.preview.replaceChildren(photo
      ? el("img", { src: this.previewUrl, alt: name, class: "tray-image" })
      : fileCard({ name, size: file.size }, null));
    this.#state("ready", "");
    this.tray.hidden = false;
    this.caption.focus();
  }

  upload() {
    if (!this.file || this.request) return;
    const file = this.file;
    const name = file.name || "pasted image.png";
    const request = new XMLHttpRequest();
    this.request = request;
    request.open("POST", `${base}/api/attachments?name=${encodeURIComponent(name)}`);
    request.setRequestHeader("Content-Type", file.type || "application/octet-stream");
    request.setRequestHeader("Accept", "application/json");
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) this.progress.value = Math.round((100 * event.loaded) / event.total);
    });
    request.addEventListener("load", () => {
      this.request = null;
      let data = null;
      try {
        data = JSON.parse(request.responseText);
      } catch {
        // not JSON: a proxy's error page
      }
      if (request.status === 201 && data?.attachment) {
        this.handlers.onSend(this.peer, this.caption.value, data.attachment);
        this.clear();
      } else {
        this.#failed(data?.error?.detail ?? `The server answered ${request.status}.`);
      }
    });
    request.addEventListener("error", () => {
      this.request = null;
      this.#failed("Can't reach ChatX. Check your connection and try again.");
    });
    request.addEventListener("abort", () => {
      this.request = null;
    });
    this.progress.value = 0;
    const focused = this.tray.contains(document.activeElement);
    this.#state("uploading", `Uploading ${name}…`);
    if (focused) this.cancelButton.focus(); // the button pressed is hidden while the upload runs
    request.send(file);
  }

  // Cancels an upload under way, and forgets the file; focus goes back to the message box.
  clear() {
    const hadFocus = this.tray.contains(document.activeElement);
    const uploading = this.request;
    this.request = null;
    uploading?.abort();
    if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
    Object.assign(this, { file: null, peer: null, previewUrl: null });
    this.tray.hidden = true;
    this.preview.replaceChildren();
    this.caption.value = "";
    this.status.textContent = "";
    if (hadFocus) this.box.focus();
  }

  #failed(text) {
    const focused = this.tray.contains(document.activeElement);
    this.#state("failed", text);
    if (focused) this.retryButton.focus();
  }

  #state(state, text) {
    this.tray.dataset.state = state;
    this.progress.hidden = state !== "uploading";
    this.progress.setAttribute("aria-label", `Uploading ${this.file?.name || "the file"}`);
    this.status.textContent = state === "failed" ? `Upload failed: ${text}` : text;
    this.status.classList.toggle("error", state === "failed");
    this.sendButton.hidden = state !== "ready";
    this.retryButton.hidden = state !== "failed";
    this.cancelButton.textContent = state === "uploading" ? "Cancel upload" : "Remove attachment";
    this.caption.disabled = state === "uploading";
  }
}
