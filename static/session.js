// The session: signing out here, and finding out it ended elsewhere (the socket
// closed as signed out, or refused).
import { api, goTo, goToSignIn } from "./api.js";

export class Session {
  constructor(outbox) {
    this.outbox = outbox;
    this.signingOut = false; // signed out here: the sign-in page comes back to no conversation
  }

  // The socket was closed because the session ended.
  ended() {
    if (this.signingOut) goTo("/login");
    else goToSignIn();
  }

  // The socket was refused: perhaps the session ended.
  async check() {
    try {
      await api("GET", "/api/me");
    } catch (error) {
      if (error.status === 401) goToSignIn();
    }
  }

  async signOut() {
    this.signingOut = true;
    await api("POST", "/api/logout").catch(() => {});
    this.outbox.clear();
    goTo("/login");
  }
}
