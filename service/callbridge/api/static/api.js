// The admin API, called with the operator's token as a bearer token.
// The token lives in this tab only (sessionStorage): never in a cookie, so no
// cross-site request can carry it, and it is gone when the tab closes.

const KEY = "callbridge.admin-token";

let token = sessionStorage.getItem(KEY);

export function hasToken() {
  return Boolean(token);
}

export function setToken(value) {
  token = value;
  sessionStorage.setItem(KEY, value);
}

export function forgetToken() {
  token = null;
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Call `/v1<path>`; resolves to the envelope's `data`, throws ApiError otherwise. */
export async function api(method, path, body, bearer = token) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    headers.Authorization = `Bearer ${bearer}`;
    // Relative to /ui/, so the console works behind a path prefix too.
    response = await fetch(`../v1${path}`, init);
  } catch (err) {
    // A token with characters HTTP headers cannot carry fails here, as does the network.
    throw new ApiError(0, `request failed: ${err.message}`);
  }
  let doc = null;
  try {
    doc = await response.json();
  } catch {
    // Not JSON (a proxy error page): reported by status below.
  }
  if (!response.ok) {
    const message = doc && typeof doc.message === "string" ? doc.message : response.statusText;
    throw new ApiError(response.status, `${response.status}: ${message}`);
  }
  return doc ? doc.data : null;
}

export const seg = encodeURIComponent;
