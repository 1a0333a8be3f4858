// Subscriptions: health at a glance, re-enabling a disabled one, and recovering a
// time window (re-sending what the endpoint did not take), with the job's progress.

import { api, seg } from "./api.js";
import { badge, duration, empty, h, link, percent, table, when } from "./dom.js";

function state(sub, ctx) {
  if (!sub.enabled_in_config) return badge("off in config", "disabled");
  if (!sub.disabled) return badge("enabled");
  return h(
    "span", {},
    badge("disabled"),
    sub.disabled_reason ? h("span", { class: "muted" }, ` ${sub.disabled_reason} `) : " ",
    h(
      "button",
      {
        type: "button",
        "data-testid": "enable",
        onclick: () =>
          ctx.act(`Enabled ${sub.name}.`, () => api("POST", `/subscriptions/${seg(sub.name)}/enable`)),
      },
      "Enable",
    ),
  );
}

function breaker(sub) {
  const failures = `${sub.consecutive_failures} consecutive failure${sub.consecutive_failures === 1 ? "" : "s"}`;
  if (sub.breaker === "open") {
    return h("span", {}, badge("open", "dead"), " next probe ", when(sub.breaker_open_until_ms), h("div", { class: "muted" }, failures));
  }
  if (sub.breaker === "half_open") {
    return h("span", {}, badge("half-open", "scheduled"), h("div", { class: "muted" }, `probing · ${failures}`));
  }
  return h("span", {}, badge("closed", "delivered"), sub.consecutive_failures ? h("div", { class: "muted" }, failures) : null);
}

function queue(sub) {
  const q = sub.queue;
  return h(
    "dl", { class: "queue" },
    // waiting: a call's later events, held until its previous event's first attempt.
    ["ready", "scheduled", "waiting", "inflight"].map((k) =>
      h("div", { dataset: { state: k } }, h("dt", {}, k), h("dd", {}, String(q[k] ?? 0)))),
    h(
      "div", { dataset: { state: "dead" } },
      h("dt", {}, "dead"), h("dd", {}, q.dead ? link(["dead-letters", sub.name], null, String(q.dead)) : "0"),
    ),
  );
}

const WINDOWS = [["1 h", 3600], ["6 h", 6 * 3600], ["24 h", 86400], ["7 days", 7 * 86400]];

// A job of scope "dead" replays every dead letter (dead-letters page); "all", a window.
const about = (job) =>
  job.scope === "dead"
    ? `job ${job.id}: every dead letter as of ${new Date(job.created_ms).toISOString()}`
    : `job ${job.id} since ${new Date(job.since_ms).toISOString()}`;

function recovery(sub, jobs, ctx) {
  const choice = h(
    "select", { "aria-label": `Window to recover for ${sub.name}`, "data-testid": "recover-window" },
    WINDOWS.map(([label, seconds]) => h("option", { value: String(seconds) }, `last ${label}`)),
  );
  const start = () =>
    ctx.act(null, async () => {
      // Whole minutes: asked twice within a minute, it is the same job (no double send).
      const since = Math.floor((Date.now() - Number(choice.value) * 1000) / 60000) * 60000;
      const job = await api("POST", `/subscriptions/${seg(sub.name)}/recover`, { since });
      return `Recovering ${sub.name}: job ${job.id} ${job.state}.`;
    });
  const latest = jobs[0];
  return h(
    "td", {},
    h("div", {}, choice, " ", h("button", { type: "button", "data-testid": "recover", onclick: start }, "Recover")),
    latest
      ? h(
        "div", { class: "muted", "data-testid": "recovery", title: about(latest) },
        `${latest.scope === "dead" ? "replay of every dead letter " : ""}${latest.state}: ` +
          `${latest.scanned} of ${latest.total} looked at, ${latest.requeued} due again`,
      )
      : null,
  );
}

// Quantiles are bucket bounds; null with observations means beyond the largest bucket.
const bound = (s) => (s === null ? "> 2 h" : `≤ ${duration(s)}`);

function recent(sub) {
  const r = sub.recent;
  if (!r) return [h("td", { class: "muted" }, "—"), h("td", { class: "muted" }, "—")];
  const window = `last ${duration(r.window_s)}`;
  return [
    h(
      "td", { title: window },
      h("strong", {}, percent(r.success_ratio)),
      h("div", { class: "muted" }, `${r.successes} of ${r.attempts} attempts, ${window}`),
    ),
    h(
      "td", { title: `${window}; quantiles are histogram bucket bounds` },
      r.lag_count ? `mean ${duration(r.lag_mean_s)}` : "—",
      h(
        "div", { class: "muted" },
        r.lag_count ? `p50 ${bound(r.lag_p50_max_s)} · p95 ${bound(r.lag_p95_max_s)}` : "no delivery",
      ),
    ),
  ];
}

export function subscriptionsView(root, route, ctx) {
  const columns = ["Subscription", "State", "Breaker", "Queue", "Success", "Lag", "Recovery"];
  const [grid, rows] = table(columns, "subscriptions");
  root.append(
    h("h1", {}, "Subscriptions"),
    h(
      "p", { class: "summary" },
      "Success ratio and lag (observed change → delivered) cover this replica's attempts in the last minutes.",
    ),
    grid,
  );
  return async () => {
    const subs = await api("GET", "/subscriptions");
    const jobs = await Promise.all(subs.map((s) => api("GET", `/subscriptions/${seg(s.name)}/recover`)));
    if (!ctx.alive()) return;
    rows.replaceChildren(
      ...subs.map((s, i) =>
        h(
          "tr",
          { "data-testid": "subscription-row", dataset: { subscription: s.name } },
          h("td", {}, h("strong", {}, s.name), h("div", { class: "muted url" }, s.url)),
          h("td", {}, state(s, ctx)),
          h("td", { "data-testid": "breaker" }, breaker(s)),
          h("td", {}, queue(s)),
          ...recent(s),
          recovery(s, jobs[i], ctx),
        ),
      ),
    );
    if (!subs.length) rows.append(empty(columns.length, "No subscription is configured."));
  };
}
