// The unread total in the tab title, desktop notifications for people who
// asked for them with the button (never on page load), and a short sound for a
// message arriving while the tab is in the background, for people who turned
// it on in the account dialog (off by default).

const supported = "Notification" in window;
const SOUND_KEY = "chatx.sound";
let audio = null;

export function soundOn() {
  try {
    return localStorage.getItem(SOUND_KEY) === "on";
  } catch {
    return false;
  }
}

// Called from the click that turns it on: a browser lets sound start only
// after the person did something on the page.
export function setSound(on) {
  try {
    if (on) localStorage.setItem(SOUND_KEY, "on");
    else localStorage.removeItem(SOUND_KEY);
  } catch {
    // storage disabled: the choice holds for this page
  }
  if (on) unlockSound();
}

function unlockSound() {
  audio ??= new AudioContext();
  if (audio.state === "suspended") audio.resume().catch(() => {});
}

// A soft two-note beep, made here rather than fetched.
function beep() {
  if (!audio) return;
  const start = audio.currentTime;
  const gain = audio.createGain();
  gain.connect(audio.destination);
  gain.gain.setValueAtTime(0.0001, start);
  gain.gain.exponentialRampToValueAtTime(0.2, start + 0.02);
  gain.gain.exponentialRampToValueAtTime(0.0001, start + 0.3);
  const tone = audio.createOscillator();
  tone.type = "sine";
  tone.frequency.setValueAtTime(880, start);
  tone.frequency.setValueAtTime(1320, start + 0.12);
  tone.connect(gain);
  tone.start(start);
  tone.stop(start + 0.3);
}

// With the sound on, the first click or key on a reloaded page lets it play.
for (const kind of ["pointerdown", "keydown"]) {
  window.addEventListener(kind, () => soundOn() && unlockSound(), { once: true, capture: true });
}

export function setupNotificationButton(button) {
  if (!supported || Notification.permission !== "default") return;
  button.hidden = false;
  button.addEventListener("click", async () => {
    await Notification.requestPermission();
    button.hidden = Notification.permission === "default";
  });
}

export function notifyMessage(message, onOpen) {
  if (document.hidden && soundOn()) beep();
  if (!supported || Notification.permission !== "granted" || !document.hidden) return;
  const notification = new Notification(message.from, { body: message.body, tag: `chatx-${message.from}` });
  notification.onclick = () => {
    window.focus();
    onOpen();
    notification.close();
  };
}

export function showUnreadInTitle(total) {
  document.title = total > 0 ? `(${total}) ChatX` : "ChatX";
}
