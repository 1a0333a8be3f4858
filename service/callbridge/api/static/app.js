// The console's shell: token prompt, hash routes, live refresh, messages.

import { api, ApiError, forgetToken, hasToken, seg, setToken } from "./api.js";
import { batchView, batchesView, callView } from "./batches.js";
import { deadLettersView } from "./deadletters.js";
import { h } from "./dom.js";
import { subscriptionsView } from "./subscriptions.js";

const REFRESH_MS = 3000;

const $ = (id) => document.getElementById(id);
const login = $("login");
const shell = $("shell");
const view = $("view");
const live = $("live");
const flash = $("flash");

// Routes: #/batches, #/batches/<id>, #/batches/<id>/calls/<call>, #/subscriptions,
// #/dead-letters[/<subscription>]. Segments are URI-encoded by dom.href().
function parseRoute() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const segments = path ? path.split("/").map(decodeURIComponent) : [];
  return { path: segments, query: new URLSearchParams(query || "") };
}

function pick(route) {
  const [top, , sub] = route.path;
  const n = route.path.length;
  if (top === "batches" && n === 2) return batchView;
  if (top === "batches" && n === 4 && sub === "calls") return callView;
  if (top === "subscriptions") return subscriptionsView;
  if (top === "dead-letters") return deadLettersView;
  return batchesView;
}

let generation = 0;
let current = null; // { generation, refresh, busy }

function say(text, kind = "ok") {
  flash.textContent = text;
  flash.className = `flash flash-${kind}`;
  flash.hidden = !text;
}

function showLogin(message) {
  generation += 1;
  current = null;
  view.replaceChildren();
  shell.hidden = true;
  login.hidden = false;
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  $("token").focus();
}

async function refresh() {
  const run = current;
  if (!run) return;
  if (run.busy) {
    // Whatever is in flight may predate an action: fetch once more when it lands.
    run.again = true;
    return;
  }
  run.busy = true;
  run.again = false;
  const started = performance.now();
  try {
    await run.refresh();
    if (run.generation === generation) {
      // Fetch and render time of the view, for the curious (and the scale test).
      const ms = Math.round(performance.now() - started);
      live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
      live.title = `refreshed every ${REFRESH_MS / 1000} s; the last refresh took ${ms} ms`;
      live.dataset.ms = String(ms);
      live.className = "live";
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      forgetToken();
      showLogin("The admin token was not accepted (401). Enter it again.");
    } else if (run.generation === generation) {
      live.textContent = `not updated: ${err.message}`;
      live.className = "live stale";
    }
  } finally {
    run.busy = false;
  }
  if (run.again && run === current) await refresh();
}

const ctx = (mine) => ({
  alive: () => mine === generation,
  refresh,
  go: (hash) => location.replace(hash),
  /** Run an operator action, say how it went, refresh the view. */
  act: async (message, action) => {
    try {
      const result = await action();
      say(typeof result === "string" ? result : message);
    } catch (err) {
      say(`Failed: ${err.message}`, "error");
    }
    await refresh();
  },
  redeliverButton: (eventId) =>
    h(
      "button",
      {
        type: "button", "data-testid": "redeliver",
        onclick: () => ctx(mine).act(null, () => redeliver(eventId)),
      },
      "Redeliver",
    ),
});

async function redeliver(eventId) {
  const r = await api("POST", `/events/${seg(eventId)}/redeliver`);
  return `Event ${r.event_id} scheduled again for ${r.subscriptions.join(", ")}.`;
}

function show() {
  if (!hasToken()) {
    showLogin();
    return;
  }
  login.hidden = true;
  shell.hidden = false;
  generation += 1;
  const route = parseRoute();
  for (const a of document.querySelectorAll("#nav a")) {
    a.toggleAttribute("aria-current", a.dataset.top === (route.path[0] || "batches"));
  }
  view.replaceChildren();
  const mine = generation;
  current = { generation: mine, refresh: pick(route)(view, route, ctx(mine)), busy: false, again: false };
  refresh();
}

login.addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  try {
    // Check the token before keeping it: a wrong one shows an error, never data.
    await api("GET", "/batches", undefined, value);
  } catch (err) {
    const why = err instanceof ApiError && err.status === 401 ? "The admin token was not accepted (401)." : `The admin API did not answer: ${err.message}`;
    showLogin(why);
    return;
  }
  $("token").value = "";
  setToken(value);
  say("");
  show();
});

$("logout").addEventListener("click", () => {
  forgetToken();
  say("");
  showLogin();
});

$("redeliver-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("redeliver-id");
  const id = input.value.trim();
  if (!id) return;
  ctx(generation).act(null, async () => {
    const message = await redeliver(id);
    input.value = "";
    return message;
  });
});

window.addEventListener("hashchange", () => {
  say("");
  show();
});
setInterval(() => {
  if (!document.hidden) refresh();
}, REFRESH_MS);
show();
