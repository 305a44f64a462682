// Building elements without ever parsing user text as HTML.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

export function hidden(text) {
  return el("span", { class: "visually-hidden", text });
}

const HUES = 8;

function avatarHue(username) {
  let hash = 0;
  for (const char of username.toLowerCase()) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return `hue-${hash % HUES}`;
}

export function fillAvatar(node, username) {
  node.textContent = [...username][0].toUpperCase();
  node.className = `avatar ${avatarHue(username)}`;
}
