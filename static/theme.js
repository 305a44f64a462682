// The theme: the system's (by default), light or dark, remembered in this
// browser. The stylesheet follows the system while no theme is set. A chosen
// theme is also kept in a cookie, so that the server writes it into the page
// and a dark theme does not flash light while the page loads.

const KEY = "chatx.theme";
const COOKIE = "chatx_theme";
export const THEMES = ["system", "light", "dark"];

export function savedTheme() {
  try {
    const theme = localStorage.getItem(KEY);
    return THEMES.includes(theme) ? theme : "system";
  } catch {
    return "system";
  }
}

export function setTheme(theme) {
  try {
    if (theme === "system") localStorage.removeItem(KEY);
    else localStorage.setItem(KEY, theme);
  } catch {
    // storage disabled: the choice holds for this page
  }
  applyTheme(theme);
  keepInCookie(theme);
}

function keepInCookie(theme) {
  const path = `${document.body?.dataset.base ?? ""}/`;
  const age = theme === "system" ? 0 : 400 * 24 * 3600;
  document.cookie = `${COOKIE}=${theme}; path=${path}; max-age=${age}; SameSite=Lax`;
}

function applyTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
}

applyTheme(savedTheme());
if (savedTheme() !== "system") keepInCookie(savedTheme()); // chosen before the cookie existed, or about to expire
// Another tab of this browser chose a theme.
window.addEventListener("storage", (event) => event.key === KEY && applyTheme(savedTheme()));
