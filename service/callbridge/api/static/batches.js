// Batches: progress of every batch, one batch's calls, one call's timeline.

import { api, seg } from "./api.js";
import {
  badge, bar, clock, duration, empty, h, href, legend, link, pager, table, traceRef, when,
} from "./dom.js";

const PAGE = 50;
// The documented statuses in lifecycle order; others (new ones) follow, by name.
const ORDER = [
  "pending", "queued", "ringing", "answered", "in_progress",
  "completed", "failed", "no_answer", "busy", "cancelled",
];
const rank = (s) => (ORDER.includes(s) ? ORDER.indexOf(s) : ORDER.length);
const byLifecycle = ([a], [b]) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);

function completions(n) {
  if (!n) return "not completed yet";
  return n === 1 ? "completed once" : `completed ${n} times (redials reopened it)`;
}

/** [label, count, css class] for the bar: pending, active, then each ending. */
function parts(batch) {
  const p = batch.progress;
  return [
    ["pending", p.pending, "pending"],
    ["active", p.active, "active"],
    ...Object.entries(p.ended).map(([status, n]) => [status, n, status]),
  ];
}

function owner(batch) {
  if (!batch.owner) return h("span", { class: "muted" }, "nobody");
  // Lease tokens are "<replica id>:<random>".
  const replica = batch.owner.replace(/:[^:]*$/, "");
  return h(
    "span",
    { title: batch.owner },
    replica,
    batch.owned_here ? h("span", { class: "muted" }, " (this replica)") : null,
  );
}

function period(batch) {
  if (batch.poll_period_s !== null && batch.poll_period_s !== undefined) {
    return h("span", { title: "measured by this replica" }, `every ${duration(batch.poll_period_s)}`);
  }
  if (batch.poll_interval_s === null) return h("span", { class: "muted" }, "not polled");
  return h("span", { title: "configured for its lifecycle" }, `every ${duration(batch.poll_interval_s)}`);
}

function done(batch) {
  const ended = Object.values(batch.progress.ended).reduce((a, b) => a + b, 0);
  return `${ended} / ${batch.total}`;
}

export function batchesView(root, route, ctx) {
  const offset = Math.max(0, Number(route.query.get("offset")) || 0);
  const columns = ["Batch", "Progress", "Ended", "Lifecycle", "Owner", "Last poll", "Poll period"];
  const [grid, rows] = table(columns, "batches");
  const summary = h("p", { class: "summary" });
  const pages = h("div");
  root.append(h("h1", {}, "Batches"), summary, grid, pages);
  return async () => {
    // The list comes whole (ordered by id); the page draws PAGE rows of it.
    const batches = await api("GET", "/batches");
    if (!ctx.alive()) return;
    const calls = batches.reduce((n, b) => n + b.total, 0);
    summary.textContent = `${batches.length} batches watched, ${calls} calls observed.`;
    // Past the end (batches removed meanwhile): the last page.
    const from = Math.min(offset, Math.max(0, Math.floor((batches.length - 1) / PAGE) * PAGE));
    rows.replaceChildren(
      ...batches.slice(from, from + PAGE).map((b) =>
        h(
          "tr",
          { dataset: { batch: b.id }, "data-testid": "batch-row" },
          h("td", {}, link(["batches", b.id], null, b.id)),
          h("td", { class: "progress" }, bar(parts(b), `progress of ${b.id}`), legend(parts(b))),
          h("td", { class: "num" }, done(b)),
          h("td", {}, badge(b.lifecycle)),
          h("td", {}, owner(b)),
          h("td", {}, when(b.last_poll_ms)),
          h("td", {}, period(b)),
        ),
      ),
    );
    if (!batches.length) rows.append(empty(columns.length, "No batch is watched yet."));
    pages.replaceChildren(pager(from, PAGE, batches.length, (o) => href(["batches"], { offset: o })));
  };
}

export function batchView(root, route, ctx) {
  const [, batchId] = route.path;
  const status = route.query.get("status") || null;
  const offset = Math.max(0, Number(route.query.get("offset")) || 0);
  const head = h("div", { class: "batch-head" });
  const filters = h("nav", { class: "chips", "aria-label": "filter by status" });
  const columns = ["Call", "Status", "Sequence"];
  const [grid, rows] = table(columns, "calls");
  const pages = h("div");
  root.append(
    h("p", { class: "crumbs" }, link(["batches"], null, "Batches"), " / ", batchId),
    h("h1", {}, "Batch ", h("code", {}, batchId)),
    head, filters, grid, pages,
  );
  const query = (extra) => ({ ...(status ? { status } : {}), ...extra });
  return async () => {
    const qs = new URLSearchParams({ limit: PAGE, offset, ...(status ? { status } : {}) });
    const [batches, page] = await Promise.all([
      api("GET", "/batches"),
      api("GET", `/batches/${seg(batchId)}/calls?${qs}`),
    ]);
    if (!ctx.alive()) return;
    const batch = batches.find((b) => b.id === batchId);
    head.replaceChildren(
      ...(batch
        ? [
          bar(parts(batch), `progress of ${batchId}`),
          legend(parts(batch)),
          h(
            "p", { class: "facts" },
            badge(batch.lifecycle), " owner ", owner(batch), " · last poll ", when(batch.last_poll_ms),
            " · ", period(batch), ` · ${completions(batch.completions)}`,
          ),
        ]
        : [h("p", { class: "muted" }, "This batch is not watched any more.")]),
    );
    const counts = batch ? batch.counts : {};
    const chip = (label, value, n) =>
      h(
        "a",
        {
          href: href(["batches", batchId], value ? { status: value } : null),
          class: "chip",
          "aria-current": value === status ? "true" : null,
        },
        `${label} (${n})`,
      );
    filters.replaceChildren(
      chip("all", null, batch ? batch.total : page.total),
      ...Object.entries(counts).sort(byLifecycle).map(([s, n]) => chip(s, s, n)),
    );
    rows.replaceChildren(
      ...page.items.map((c) =>
        h(
          "tr",
          { "data-testid": "call-row", dataset: { call: c.call_id } },
          h("td", {}, link(["batches", batchId, "calls", c.call_id], null, h("code", {}, c.call_id))),
          h("td", {}, badge(c.status)),
          h("td", { class: "num" }, String(c.sequence)),
        ),
      ),
    );
    if (!page.items.length) rows.append(empty(columns.length, "No calls match."));
    pages.replaceChildren(
      pager(offset, PAGE, page.total, (o) => href(["batches", batchId], query({ offset: o }))),
    );
  };
}

function deliveryCell(event, ctx) {
  if (!event.deliveries.length) return h("span", { class: "muted" }, "no subscription");
  return h(
    "ul",
    { class: "deliveries" },
    event.deliveries.map((d) => {
      const last = d.history.length ? d.history[d.history.length - 1] : null;
      const result = last ? ` · last ${last.status ?? last.error ?? "?"} ${clock(last.at_ms)}` : "";
      return h(
        "li",
        { dataset: { subscription: d.subscription } },
        h("strong", {}, d.subscription), " ", badge(d.state),
        ` ${d.attempts} attempt${d.attempts === 1 ? "" : "s"}${result}`,
        d.state === "dead" ? [" ", link(["dead-letters", d.subscription], null, "dead letters")] : null,
        d.trace_id ? [" · ", traceRef(d)] : null,
      );
    }),
  );
}

export function callView(root, route, ctx) {
  const [, batchId, , callId] = route.path;
  const state = h("p", { class: "facts" });
  const columns = ["Observed", "Status", "Sequence", "Event", "Deliveries", ""];
  const [grid, rows] = table(columns, "timeline");
  root.append(
    h(
      "p", { class: "crumbs" },
      link(["batches"], null, "Batches"), " / ", link(["batches", batchId], null, batchId), " / ", callId,
    ),
    h("h1", {}, "Call ", h("code", {}, callId)),
    state, grid,
  );
  return async () => {
    const t = await api("GET", `/batches/${seg(batchId)}/calls/${seg(callId)}/timeline`);
    if (!ctx.alive()) return;
    state.replaceChildren("Now ", badge(t.status), ` at sequence ${t.sequence}.`);
    rows.replaceChildren(
      ...t.timeline.map((e) =>
        h(
          "tr",
          { "data-testid": "observation" },
          h("td", {}, h("time", { title: new Date(e.at_ms).toISOString() }, clock(e.at_ms))),
          h("td", {}, badge(e.status)),
          h("td", { class: "num" }, String(e.sequence)),
          h(
            "td", {},
            e.event_type
              ? [h("div", {}, e.event_type), h("code", { class: "id" }, e.event_id)]
              : h("span", { class: "muted" }, "recorded, no event"),
          ),
          h("td", {}, e.event_id ? deliveryCell(e, ctx) : null),
          h("td", {}, e.event_id ? ctx.redeliverButton(e.event_id) : null),
        ),
      ),
    );
    if (!t.timeline.length) rows.append(empty(columns.length, "No observation kept."));
  };
}
