// Subscriptions: health at a glance, and re-enabling a disabled one.

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
  const columns = ["Subscription", "State", "Breaker", "Queue", "Success", "Lag"];
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
    if (!ctx.alive()) return;
    rows.replaceChildren(
      ...subs.map((s) =>
        h(
          "tr",
          { "data-testid": "subscription-row", dataset: { subscription: s.name } },
          h("td", {}, h("strong", {}, s.name), h("div", { class: "muted url" }, s.url)),
          h("td", {}, state(s, ctx)),
          h("td", { "data-testid": "breaker" }, breaker(s)),
          h("td", {}, queue(s)),
          ...recent(s),
        ),
      ),
    );
    if (!subs.length) rows.append(empty(columns.length, "No subscription is configured."));
  };
}
