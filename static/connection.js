// The connection banner: "Connecting…" until the socket first opens,
// "Reconnecting…" while it is down. Meanwhile nobody's presence is known.
export class ConnectionStatus {
  constructor(banner, app, { onChange }) {
    this.banner = banner;
    this.app = app;
    this.handlers = { onChange };
    this.connected = false;
  }

  // state: "connecting", "open" or "reconnecting", as the socket says.
  show(state) {
    this.banner.textContent = state === "open" ? "" : state === "connecting" ? "Connecting…" : "Reconnecting…";
    this.app.classList.toggle("disconnected", state !== "open");
    this.connected = state === "open";
    this.handlers.onChange();
  }
}
