// HTTP helpers. Every URL starts with the mount prefix the server put on <body>.

const base = document.body.dataset.base || "";

// What the server accepts as a username.
export const USERNAME_RE = /^[A-Za-z0-9_.-]{3,32}$/;

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

export async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(base + path, init);
  } catch {
    throw new ApiError(0, "network", "Can't reach ChatX. Check your connection and try again.");
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = data && data.error;
    throw new ApiError(response.status, error ? error.code : `http_${response.status}`,
      error ? error.detail : `The server answered ${response.status}.`);
  }
  return data;
}

// A `next` from a URL, made safe: only the chat page of this server, with a
// fragment naming a conversation. Anything else (another origin, another path,
// "//evil.example", "javascript:…") is "/".
export function safeNext(raw) {
  if (typeof raw !== "string" || !raw.startsWith("/") || raw.startsWith("//") || raw.startsWith("/\\")) return "/";
  let url;
  try {
    url = new URL(raw, location.origin);
  } catch {
    return "/";
  }
  if (url.origin !== location.origin || url.pathname !== "/" || url.search) return "/";
  return url.hash.length > 1 ? `/${url.hash}` : "/";
}

// The sign-in page, coming back to the conversation open now (if any). Where
// the host application signs people in, the chat page sends them to its page.
export function goToSignIn() {
  if ("hosted" in document.body.dataset) return goTo("/");
  const next = location.hash.length > 1 ? `?next=${encodeURIComponent(`/${location.hash}`)}` : "";
  goTo(`/login${next}`);
}

export function goTo(path) {
  location.assign(base + path);
}

// No `since` on a fresh page (the history comes over HTTP, the socket starts
// live); after that, the highest stream position seen, so nothing is lost.
export function socketUrl(since) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = since === null ? "" : `?since=${since}`;
  return `${scheme}//${location.host}${base}/ws${query}`;
}
