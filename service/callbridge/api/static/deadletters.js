// Dead letters of one subscription: attempt history, body, replay, redeliver.
// Replay of a few (by id) happens in the request; replay of all starts a background
// job (a recovery job of scope "dead"), whose progress the page follows.

import { api, seg } from "./api.js";
import { badge, clock, empty, h, href, pager, table, traceRef } from "./dom.js";

const PAGE = 50;

// Kept across refreshes (and pages) of the same subscription.
const selected = new Set();
const expanded = new Set();
let selectionOf = null;

function pretty(body) {
  try {
    return JSON.stringify(JSON.parse(body), null, 2);
  } catch {
    return body;
  }
}

function lastResult(record) {
  const last = record.history[record.history.length - 1];
  if (!last) return "—";
  return last.status !== null ? `HTTP ${last.status}` : last.error ?? "no answer";
}

function details(record) {
  const [history, rows] = table(["#", "At", "HTTP", "Outcome", "Error", "Took", "Response"], "history");
  rows.append(
    ...record.history.map((a, i) =>
      h(
        "tr", {},
        h("td", { class: "num" }, String(i + 1)),
        h("td", {}, h("time", { title: new Date(a.at_ms).toISOString() }, clock(a.at_ms))),
        h("td", { class: "num" }, a.status === null ? "—" : String(a.status)),
        h("td", {}, badge(a.outcome)),
        h("td", {}, a.error ?? ""),
        h("td", { class: "num" }, `${a.duration_ms} ms`),
        h("td", {}, h("code", { class: "excerpt" }, a.response)),
      ),
    ),
  );
  return h(
    "div", { class: "details", "data-testid": "details" },
    record.trace_id ? h("p", { class: "facts" }, traceRef(record)) : null,
    h("h3", {}, "Attempts"), history,
    h("h3", {}, "Body"), h("pre", { class: "body", "data-testid": "body" }, pretty(record.body)),
  );
}

export function deadLettersView(root, route, ctx) {
  const name = route.path[1] || null;
  const offset = Math.max(0, Number(route.query.get("offset")) || 0);
  if (selectionOf !== name) {
    selected.clear();
    expanded.clear();
    selectionOf = name;
  }
  const tabs = h("nav", { class: "chips", "aria-label": "subscription" });
  const summary = h("p", { class: "summary", "data-testid": "dead-summary" });
  const count = h("span");
  const replaySelected = h(
    "button",
    {
      type: "button", "data-testid": "replay-selected", disabled: true,
      onclick: () => {
        const ids = [...selected];
        ctx.act(null, async () => {
          const r = await api("POST", `/subscriptions/${seg(name)}/dead-letters/replay`, { ids });
          selected.clear();
          return `Replayed ${r.replayed} of ${ids.length} selected.`;
        });
      },
    },
    "Replay selected ", count,
  );
  const confirm = h("span", { class: "confirm", hidden: true });
  const replayAll = h(
    "button",
    { type: "button", "data-testid": "replay-all", onclick: () => { confirm.hidden = false; } },
    "Replay all…",
  );
  confirm.append(
    "Replay every dead letter of this subscription? ",
    h(
      "button",
      {
        type: "button", class: "danger", "data-testid": "confirm-replay-all",
        onclick: () => {
          confirm.hidden = true;
          ctx.act(null, async () => {
            const r = await api("POST", `/subscriptions/${seg(name)}/dead-letters/replay`, {});
            selected.clear();
            return `Replaying every dead letter of ${name} in the background: job ${r.job.id}, ${r.job.total} to look at.`;
          });
        },
      },
      "Yes, replay all",
    ),
    " ",
    h("button", { type: "button", onclick: () => { confirm.hidden = true; } }, "Cancel"),
  );
  // The newest replay-all job of this subscription, as its last refresh found it.
  const replayJob = h("p", { class: "muted", "data-testid": "replay-job", hidden: true });
  let job = null;
  const columns = ["", "Event", "Type", "Attempts", "Last attempt", "Result", "", ""];
  const [grid, rows] = table(columns, "dead-letters");
  const pages = h("div");
  const pageBox = h("input", {
    type: "checkbox", "aria-label": "select this page",
    onchange: () => {
      for (const box of rows.querySelectorAll("input[data-event]")) {
        box.checked = pageBox.checked;
        if (pageBox.checked) selected.add(box.dataset.event);
        else selected.delete(box.dataset.event);
      }
      sync();
    },
  });
  grid.querySelector("th").append(pageBox);
  const sync = () => {
    count.textContent = `(${selected.size})`;
    replaySelected.disabled = selected.size === 0;
  };
  root.append(
    h("h1", {}, "Dead letters"),
    tabs, summary,
    name ? h("div", { class: "actions" }, replaySelected, " ", replayAll, " ", confirm) : null,
    replayJob,
    name ? grid : null, pages,
  );
  sync();

  let page = null;

  function row(record) {
    const id = record.event_id;
    const box = h("input", {
      type: "checkbox", "aria-label": `select ${id}`, dataset: { event: id },
      onchange: () => { (box.checked ? selected.add(id) : selected.delete(id)); sync(); },
    });
    box.checked = selected.has(id);
    const toggle = h(
      "button",
      {
        type: "button", class: "link", "aria-expanded": String(expanded.has(id)), "data-testid": "toggle",
        onclick: () => {
          (expanded.has(id) ? expanded.delete(id) : expanded.add(id));
          draw();
        },
      },
      expanded.has(id) ? "hide" : "details",
    );
    const replay = h(
      "button",
      {
        type: "button", "data-testid": "replay-one",
        onclick: () => ctx.act(null, async () => {
          const r = await api("POST", `/subscriptions/${seg(name)}/dead-letters/replay`, { ids: [id] });
          selected.delete(id);
          return r.replayed ? `Replayed ${id}.` : `${id} was not dead any more.`;
        }),
      },
      "Replay",
    );
    const last = record.history[record.history.length - 1];
    const main = h(
      "tr", { "data-testid": "dead-letter-row", dataset: { event: id } },
      h("td", {}, box), h("td", {}, h("code", { class: "id" }, id)), h("td", {}, record.type),
      h("td", { class: "num" }, String(record.attempts)), h("td", {}, last ? clock(last.at_ms) : "—"),
      h("td", {}, lastResult(record)), h("td", {}, toggle), h("td", {}, replay),
    );
    if (!expanded.has(id)) return [main];
    return [main, h("tr", { class: "expanded" }, h("td", { colspan: columns.length }, details(record)))];
  }

  return async () => {
    const subs = await api("GET", "/subscriptions");
    if (!ctx.alive()) return;
    tabs.replaceChildren(
      ...subs.map((s) =>
        h(
          "a",
          { href: href(["dead-letters", s.name]), class: "chip", "aria-current": s.name === name ? "true" : null },
          `${s.name} (${s.queue.dead})`,
        ),
      ),
    );
    if (!name) {
      summary.textContent = subs.length ? "Pick a subscription." : "No subscription is configured.";
      if (subs.length) ctx.go(href(["dead-letters", subs[0].name]));
      return;
    }
    const qs = new URLSearchParams({ limit: PAGE, offset });
    const [found, jobs] = await Promise.all([
      api("GET", `/subscriptions/${seg(name)}/dead-letters?${qs}`),
      api("GET", `/subscriptions/${seg(name)}/recover`),
    ]);
    if (!ctx.alive()) return;
    page = found;
    job = jobs.find((j) => j.scope === "dead") ?? null;
    draw();
  };

  function draw() {
    replayJob.hidden = !job;
    if (job) {
      replayJob.title = `job ${job.id}, asked at ${new Date(job.created_ms).toISOString()}`;
      replayJob.textContent =
        `Replay of every dead letter ${job.state}: ${job.scanned} of ${job.total} looked at, ${job.requeued} due again`;
    }
    summary.replaceChildren(`${page.total} dead letter${page.total === 1 ? "" : "s"} for `, h("strong", {}, name), ", oldest first.");
    rows.replaceChildren(...page.items.flatMap(row));
    if (!page.items.length) rows.append(empty(columns.length, "Nothing here: every delivery arrived or is still being tried."));
    pageBox.checked = page.items.length > 0 && page.items.every((r) => selected.has(r.event_id));
    pages.replaceChildren(pager(offset, PAGE, page.total, (o) => href(["dead-letters", name], { offset: o })));
    sync();
  }
}
