// The account dialog: theme and sound, password change, signing out
// everywhere, and deleting the account after a confirmation that names what
// goes and asks for the password.
import { api, goToSignIn } from "./api.js";
import { savedTheme, setTheme } from "./theme.js";
import { setSound, soundOn } from "./notify.js";

const MIN_PASSWORD = 8;

const WORDS = {
  bad_credentials: "That isn't your current password.",
  weak_password: "Use at least 8 characters for the new password.",
};

export class AccountDialog {
  // session: signs out here or everywhere, and ends after the deletion.
  constructor(session, opener) {
    this.session = session;
    const $ = (id) => document.getElementById(id);
    this.dialog = $("account-dialog");
    this.confirm = $("confirm-delete-account");
    this.opener = opener;
    opener.addEventListener("click", () => this.open());
    $("account-close").addEventListener("click", () => this.dialog.close());
    this.dialog.addEventListener("close", () => opener.focus());

    for (const radio of this.dialog.querySelectorAll("input[name=theme]")) {
      radio.addEventListener("change", () => radio.checked && setTheme(radio.value));
    }
    const sound = $("sound");
    sound.addEventListener("change", () => setSound(sound.checked));

    this.#setupPassword($("password-form"), $("current-password"), $("new-password"), $("password-result"));
    $("sign-out-everywhere").addEventListener("click", () => session.signOut({ everywhere: true }));
    $("delete-account").addEventListener("click", () => this.#confirmDelete());
    this.#setupDelete($("delete-account-form"), $("delete-password"), $("delete-result"), $("delete-cancel"));
  }

  get isOpen() {
    return this.dialog.open || this.confirm.open;
  }

  open() {
    const theme = savedTheme();
    for (const radio of this.dialog.querySelectorAll("input[name=theme]")) radio.checked = radio.value === theme;
    document.getElementById("sound").checked = soundOn();
    this.dialog.showModal();
  }

  #setupPassword(form, current, next, result) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      result.textContent = "";
      result.className = "form-result";
      const problem = !current.value ? [current, "Enter your current password."]
        : next.value.length < MIN_PASSWORD ? [next, WORDS.weak_password] : null;
      if (problem) return this.#show(result, problem[1], problem[0]);
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        await api("POST", "/api/password", { password: current.value, new_password: next.value });
        form.reset();
        result.textContent = "Password changed. Every other device has been signed out.";
        result.classList.add("done");
      } catch (error) {
        if (error.status === 401 && error.code !== "bad_credentials") return goToSignIn();
        this.#show(result, WORDS[error.code] ?? error.message, error.code === "bad_credentials" ? current : next);
      } finally {
        button.disabled = false;
      }
    });
  }

  #confirmDelete() {
    const form = document.getElementById("delete-account-form");
    form.reset();
    document.getElementById("delete-result").textContent = "";
    this.confirm.showModal();
  }

  #setupDelete(form, password, result, cancel) {
    cancel.addEventListener("click", () => this.confirm.close());
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      result.textContent = "";
      if (!password.value) return this.#show(result, "Enter your password to delete the account.", password);
      const buttons = form.querySelectorAll("button");
      for (const button of buttons) button.disabled = true;
      try {
        await this.session.deleteAccount(password.value);
      } catch (error) {
        if (error.status === 401 && error.code !== "bad_credentials") return goToSignIn();
        this.#show(result, error.code === "bad_credentials" ? "That isn't your password." : error.message, password);
      } finally {
        for (const button of buttons) button.disabled = false;
      }
    });
  }

  #show(result, text, field) {
    result.textContent = text;
    result.classList.add("error");
    field.setAttribute("aria-invalid", "true");
    field.addEventListener("input", () => field.removeAttribute("aria-invalid"), { once: true });
    field.focus();
  }
}
