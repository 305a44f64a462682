// A WebSocket that reconnects by itself: exponential backoff with jitter,
// a ping to notice dead connections, and an immediate retry when the network
// or the tab comes back. The caller builds the URL for every attempt, so it can
// always ask for `since=<highest seq seen>`.

const BASE_DELAY = 500;
const MAX_DELAY = 15000;
const PING_EVERY = 25000;
const SIGNED_OUT = 4401;

export class ReconnectingSocket {
  constructor(makeUrl, { onFrame, onState, onSignedOut, onRefused }) {
    this.makeUrl = makeUrl;
    this.handlers = { onFrame, onState, onSignedOut, onRefused };
    this.ws = null;
    this.attempts = 0;
    this.timer = null;
    this.pinger = null;
    this.lastFrameAt = 0;
    this.pingSentAt = 0;
    this.state = "connecting";
    window.addEventListener("online", () => this.retryNow());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.retryNow();
    });
  }

  start() {
    this.#connect();
  }

  get isOpen() {
    return this.state === "open";
  }

  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  retryNow() {
    if (this.timer === null) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.attempts = 0;
    this.#connect();
  }

  #setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.handlers.onState(state);
  }

  #connect() {
    const ws = new WebSocket(this.makeUrl());
    let opened = false;
    this.ws = ws;
    ws.onopen = () => {
      opened = true;
      this.pingSentAt = 0;
      this.pinger = setInterval(() => this.#keepAlive(), PING_EVERY);
    };
    ws.onmessage = (event) => {
      this.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame.type === "hello") {
        this.attempts = 0;
        this.#setState("open");
      }
      this.handlers.onFrame(frame);
    };
    ws.onclose = (event) => this.#closed(ws, event.code, opened);
  }

  // Nothing at all since the last ping: the connection is dead. (Comparing
  // with the last ping, not the clock, stays right when a background tab's
  // timers are throttled to once a minute.)
  #keepAlive() {
    if (this.pingSentAt > this.lastFrameAt) {
      this.#drop();
      return;
    }
    this.pingSentAt = Date.now();
    this.send({ type: "ping" });
  }

  // Give up on a connection that went silent without waiting for the browser
  // to notice: its close handshake could take minutes.
  #drop() {
    const ws = this.ws;
    ws.onclose = ws.onmessage = null;
    ws.close();
    this.#closed(ws, 1006, true);
  }

  #closed(ws, code, opened) {
    if (ws !== this.ws) return;
    clearInterval(this.pinger);
    this.ws = null;
    if (code === SIGNED_OUT) {
      this.handlers.onSignedOut();
      return;
    }
    this.#setState("reconnecting");
    if (!opened) this.handlers.onRefused();
    const ceiling = Math.min(MAX_DELAY, BASE_DELAY * 2 ** this.attempts);
    this.attempts += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.#connect();
    }, delay);
  }
}
