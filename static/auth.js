// Sign-in and sign-up forms: checked here first, then the server's answer is
// shown next to the field it is about.
import { USERNAME_RE, api, goTo, safeNext } from "./api.js";
import "./theme.js";

const form = document.querySelector(".auth-form");
const mode = form.dataset.mode;
const formError = document.getElementById("form-error");
const fields = {
  username: form.elements.username,
  password: form.elements.password,
};

// Where to go once signed in: the chat page, with the conversation a link
// asked for. `/#bob` opened while signed out is redirected here as `/login#bob`;
// the fragment becomes `?next=/#bob`, which the link to the other form keeps.
const next = safeNext(new URLSearchParams(location.search).get("next") ?? (location.hash ? `/${location.hash}` : null));
if (next !== "/") {
  const query = `?next=${encodeURIComponent(next)}`;
  history.replaceState(null, "", location.pathname + query);
  for (const link of document.querySelectorAll(".switch a")) link.search = query;
}

const MESSAGES = {
  username_taken: ["username", "That username is taken. Try another one."],
  invalid_username: ["username", "Use 3–32 letters, digits, “_”, “.” or “-”, with no spaces."],
  weak_password: ["password", "Choose a password of at least 8 characters."],
  bad_credentials: ["password", "Wrong username or password."],
};

function showError(name, text) {
  const box = name ? document.getElementById(`${name}-error`) : formError;
  box.textContent = text;
  box.hidden = false;
  if (name) fields[name].setAttribute("aria-invalid", "true");
}

function clearErrors() {
  formError.hidden = true;
  for (const [name, input] of Object.entries(fields)) {
    document.getElementById(`${name}-error`).hidden = true;
    input.removeAttribute("aria-invalid");
  }
}

function localProblem(username, password) {
  if (!username) return ["username", "Enter your username."];
  if (mode === "register" && !USERNAME_RE.test(username)) return MESSAGES.invalid_username;
  if (!password) return ["password", "Enter your password."];
  if (mode === "register" && [...password].length < 8) return MESSAGES.weak_password;
  if ([...password].length > 1024) return ["password", "Passwords can be at most 1024 characters."];
  return null;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const username = fields.username.value.trim();
  const password = fields.password.value;
  const problem = localProblem(username, password);
  if (problem) {
    showError(...problem);
    fields[problem[0]].focus();
    return;
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await api("POST", `/api/${mode}`, { username, password });
    goTo(next);
  } catch (error) {
    const [name, text] = MESSAGES[error.code] || [null, error.message];
    showError(name, text);
    (name ? fields[name] : fields.username).focus();
    button.disabled = false;
  }
}

form.addEventListener("submit", submit);
for (const input of Object.values(fields)) {
  input.addEventListener("input", () => {
    input.removeAttribute("aria-invalid");
    document.getElementById(`${input.name}-error`).hidden = true;
  });
}
