// How times read in the interface, in the reader's own locale: its short
// clock ("4:02 PM", "16:02"), "Yesterday", weekday names within a week, dates
// before that, as messengers show them.

const MINUTE = 60 * 1000;
const HOUR = 60 * MINUTE;

const clock = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit" });
const dayThisYear = new Intl.DateTimeFormat(undefined, { weekday: "long", day: "numeric", month: "long" });
const dayOtherYear = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "long", year: "numeric" });
const shortDay = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short" });
const shortDate = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "numeric", year: "2-digit" });
const weekday = new Intl.DateTimeFormat(undefined, { weekday: "short" });
const longWeekday = new Intl.DateTimeFormat(undefined, { weekday: "long" });
const relativeDay = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

function startOfDay(date) {
  return new Date(date.getFullYear(), date.getMonth(), date.getDate());
}

function daysAgo(date, now = new Date()) {
  return Math.round((startOfDay(now) - startOfDay(date)) / (24 * HOUR));
}

// "Today", "Yesterday" in the locale's words, capitalised as a label.
function relative(ago) {
  const words = relativeDay.format(-ago, "day");
  return words.charAt(0).toLocaleUpperCase() + words.slice(1);
}

export function clockTime(iso) {
  return clock.format(new Date(iso));
}

// A key that is the same for two times on the same local day.
export function dayKey(iso) {
  const date = new Date(iso);
  return `${date.getFullYear()}-${date.getMonth() + 1}-${date.getDate()}`;
}

// The divider above a day's messages: "Today", "Yesterday", the weekday within
// a week, the date before that.
export function dayLabel(iso) {
  const date = new Date(iso);
  const ago = daysAgo(date);
  if (ago <= 1) return relative(Math.max(ago, 0));
  if (ago < 7) return longWeekday.format(date);
  const format = date.getFullYear() === new Date().getFullYear() ? dayThisYear : dayOtherYear;
  return format.format(date);
}

export function lastSeen(iso) {
  if (!iso) return "not seen yet";
  const date = new Date(iso);
  const elapsed = Date.now() - date.getTime();
  if (elapsed < MINUTE) return "last seen just now";
  if (elapsed < HOUR) return `last seen ${Math.floor(elapsed / MINUTE)} min ago`;
  if (daysAgo(date) === 0) return `last seen ${Math.floor(elapsed / HOUR)} h ago`;
  if (daysAgo(date) === 1) return `last seen yesterday at ${clock.format(date)}`;
  return `last seen ${shortDay.format(date)}`;
}

// The time of a conversation's last message in the list: the clock today,
// "Yesterday", the weekday within a week, the date before that.
export function listTime(iso) {
  const date = new Date(iso);
  const ago = daysAgo(date);
  if (ago <= 0) return clock.format(date);
  if (ago === 1) return relative(1);
  if (ago < 7) return weekday.format(date);
  return date.getFullYear() === new Date().getFullYear() ? shortDay.format(date) : shortDate.format(date);
}
