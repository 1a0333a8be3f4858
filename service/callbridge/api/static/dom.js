// DOM helpers. Everything from the API is untrusted: it becomes text nodes
// (Node.append with a string, textContent) or attribute values we name ourselves,
// never markup: no script of the console parses a string as HTML (a test checks it).

/** An element: h("td", {class: "num"}, "12"); strings become text nodes. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  add(el, children);
  return el;
}

function add(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** A link inside the console: `route` segments are encoded, so data cannot leave "#/". */
export function link(segments, query, ...children) {
  return h("a", { href: href(segments, query) }, ...children);
}

export function href(segments, query) {
  const path = segments.map(encodeURIComponent).join("/");
  const qs = query ? new URLSearchParams(query).toString() : "";
  return `#/${path}${qs ? `?${qs}` : ""}`;
}

/**
 * An event's trace id: a link to it in the operator's tracing UI when the API gives
 * its URL (`tracing.trace_url_template`, an http(s) URL the config checked), else the
 * id as text; nothing for an event committed with tracing off.
 */
export function traceRef(record) {
  if (!record.trace_id) return null;
  const id = h("code", { class: "id", title: record.trace_id }, record.trace_id.slice(0, 12));
  if (!/^https?:\/\//.test(record.trace_url ?? "")) return h("span", { class: "trace" }, "trace ", id);
  return h(
    "span", { class: "trace" }, "trace ",
    h("a", { href: record.trace_url, target: "_blank", rel: "noopener noreferrer", "data-testid": "trace" }, id),
  );
}

/** A CSS class suffix for a status: only plain names, anything else is "other". */
export function statusClass(status) {
  return /^[a-z][a-z_]{0,30}$/.test(status) ? status : "other";
}

export function badge(text, kind) {
  return h("span", { class: `badge badge-${statusClass(kind ?? text)}` }, text);
}

/**
 * A stacked bar: one segment per [label, count, class], sized by count.
 * Sizes go through the CSSOM (flex-grow), which the Content-Security-Policy allows,
 * not through style attributes, which it forbids.
 */
export function bar(parts, label) {
  const total = parts.reduce((n, [, count]) => n + count, 0);
  const el = h("div", { class: "bar", role: "img", "aria-label": label });
  for (const [name, count, cls] of parts) {
    if (!count) continue;
    const seg = h("span", { class: `seg seg-${statusClass(cls)}`, title: `${name}: ${count}` });
    seg.style.flexGrow = String(count);
    el.append(seg);
  }
  if (!total) el.append(h("span", { class: "seg seg-empty" }));
  return el;
}

export function legend(parts) {
  return h(
    "ul",
    { class: "legend" },
    parts.map(([name, count, cls]) =>
      h(
        "li",
        { dataset: { status: name } },
        h("span", { class: `swatch seg-${statusClass(cls)}` }),
        h("span", { class: "legend-name" }, name),
        " ",
        h("span", { class: "legend-count" }, String(count)),
      ),
    ),
  );
}

const pad = (n) => String(n).padStart(2, "0");

/** Local wall time of epoch ms: "14:03:07", with the date when not today. */
export function clock(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  if (d.toDateString() === new Date().toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

/** "4 s ago" / "in 12 s", with the exact time as a tooltip. */
export function when(ms) {
  if (ms === null || ms === undefined) return h("span", { class: "muted" }, "never");
  const s = Math.round((ms - Date.now()) / 1000);
  const text = s === 0 ? "just now" : s < 0 ? `${duration(-s)} ago` : `in ${duration(s)}`;
  return h("time", { datetime: new Date(ms).toISOString(), title: clock(ms) }, text);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 90) return `${Math.round(seconds * 10) / 10} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 360) / 10} h`;
}

export function percent(ratio) {
  return ratio === null || ratio === undefined ? "—" : `${Math.round(ratio * 1000) / 10} %`;
}

/** "51–100 of 10000" with previous / next links; `to(offset)` builds a link's query. */
export function pager(offset, limit, total, to) {
  const last = Math.max(0, Math.floor((total - 1) / limit) * limit);
  const shown = total ? `${offset + 1}–${Math.min(offset + limit, total)} of ${total}` : "none";
  const nav = (text, target, enabled) =>
    enabled ? h("a", { href: to(target), class: "page" }, text) : h("span", { class: "page off" }, text);
  return h(
    "nav",
    { class: "pager", "aria-label": "pages" },
    nav("« first", 0, offset > 0),
    nav("‹ previous", Math.max(0, offset - limit), offset > 0),
    h("span", { class: "range", "data-testid": "range" }, shown),
    nav("next ›", offset + limit, offset + limit < total),
    nav("last »", last, offset < last),
  );
}

/** A table with a header row; rows are added to the returned tbody. */
export function table(columns, testid) {
  const body = h("tbody");
  const el = h(
    "table",
    { class: "grid", "data-testid": testid },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    body,
  );
  return [el, body];
}

export function empty(columns, text) {
  return h("tr", {}, h("td", { colspan: columns, class: "muted" }, text));
}
