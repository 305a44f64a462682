// The theme: the system's (by default), light or dark, remembered in this
// browser. Applied as soon as a page's script runs; the stylesheet follows the
// system while no theme is set.

const KEY = "chatx.theme";
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
}

function applyTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
}

applyTheme(savedTheme());
// Another tab of this browser chose a theme.
window.addEventListener("storage", (event) => event.key === KEY && applyTheme(savedTheme()));
