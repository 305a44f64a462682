// The unread total in the tab title, and desktop notifications for people who
// asked for them with the button (never on page load).

const supported = "Notification" in window;

export function setupNotificationButton(button) {
  if (!supported || Notification.permission !== "default") return;
  button.hidden = false;
  button.addEventListener("click", async () => {
    await Notification.requestPermission();
    button.hidden = Notification.permission === "default";
  });
}

export function notifyMessage(message, onOpen) {
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
