// The session: signing out here (or everywhere), deleting the account, and
// finding out it ended elsewhere (the socket closed as signed out, or refused).
import { api, goTo, goToSignIn } from "./api.js";

export class Session {
  constructor(outbox) {
    this.outbox = outbox;
    this.leavingTo = null; // signed out or deleted here: where the page goes, with no conversation to come back to
  }

  // The socket was closed because the session ended.
  ended() {
    if (this.leavingTo) goTo(this.leavingTo);
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

  async signOut({ everywhere = false } = {}) {
    this.leavingTo = "/login";
    await api("POST", everywhere ? "/api/logout?everywhere=true" : "/api/logout").catch(() => {});
    this.outbox.clear();
    goTo("/login");
  }

  // Throws the server's refusal (a wrong password) and stays signed in.
  async deleteAccount(password) {
    this.leavingTo = "/register";
    try {
      await api("DELETE", "/api/me", { password });
    } catch (error) {
      this.leavingTo = null;
      throw error;
    }
    this.outbox.clear();
    goTo(this.leavingTo);
  }
}
