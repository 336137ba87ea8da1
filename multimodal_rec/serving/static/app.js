// The shopping guide: a session of clicked products, recommendations that follow it (POST /recommend),
// filters from the catalogue's facets, similar products. Plain DOM, text set with textContent only.
// Where the server needs a read token, the page asks for it once, keeps it for the tab (sessionStorage) and sends
// it as "Authorization: Bearer"; pictures then come through fetch() and blob URLs, since <img> cannot send it.
"use strict";

const K = 12;
const TOKEN_KEY = "mmrec-read-token";
const state = { userId: null, before: [], session: [], titles: new Map(), facets: null, busy: 0, asked: 0,
                token: sessionStorage.getItem(TOKEN_KEY) };
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

const authorization = () => (state.token ? { Authorization: `Bearer ${state.token}` } : {});

function askToken(why) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("token-why").textContent = why;
  if (!state.facets) $("status").textContent = "waiting for the access token";
  $("token-form").hidden = false;
  $("token").focus();
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: { ...(body ? { "Content-Type": "application/json" } : {}), ...authorization() },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    // the page only reads: a 401 or 403 means the read token is missing or wrong
    if (response.status === 401) askToken("This shop's recommender needs its access token.");
    if (response.status === 403) askToken("That token is not accepted: enter the read token.");
    const detail = data.detail || response.statusText;
    const where = (data.errors || []).map((e) => `${e.where}: ${e.problem}`).join("; ");
    throw Object.assign(new Error(`${detail}${where ? ` (${where})` : ""} [HTTP ${response.status}]`),
                        { status: response.status });
  }
  return data;
}

// pictures behind the token: fetched when they come near the view (as loading="lazy" would), shown by blob URL
const nearView = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    nearView.unobserve(entry.target);
    fetchImage(entry.target);
  }
}, { rootMargin: "300px" });

async function fetchImage(img) {
  try {
    const response = await fetch(img.dataset.src, { headers: authorization() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const url = URL.createObjectURL(await response.blob());
    const release = () => URL.revokeObjectURL(url);  // once decoded, the picture no longer needs its URL
    img.addEventListener("load", release, { once: true });
    img.addEventListener("error", release, { once: true });
    img.src = url;
  } catch (error) {
    img.title = `picture not loaded: ${error.message}`;
  }
}

function image(id, title, size = 256) {
  const src = `/items/${encodeURIComponent(id)}/image?size=${size}`;
  const img = el("img", { alt: title || `item ${id}`, loading: "lazy" });
  if (!state.token) img.src = src;
  else {
    img.dataset.src = src;
    nearView.observe(img);
  }
  return img;
}

function describe(attributes) {
  return Object.entries(attributes || {})
    .filter(([key]) => key !== "cold")
    .map(([key, value]) => {
      if (Array.isArray(value)) return value.slice(0, 3).join(", ");
      if (key === "price" && typeof value === "number") return `$${value.toFixed(2)}`;
      if (typeof value === "number" && key !== "year") return `${key} ${Number.isInteger(value) ? value : value.toFixed(1)}`;
      return String(value);
    })
    .join(" · ");
}

function reasonText(reason) {
  if (reason.kind === "profile") return "matches your profile";
  if (reason.kind === "popularity") return "popular in the shop";
  const title = `“${reason.because_of_title}”`;
  switch (reason.modality) {
    case "image": return `looks like ${title} you viewed`;
    case "text": return `described like ${title}`;
    case "id": case "neighbours": return `popular with people who viewed ${title}`;
    case "attributes": return `the same kind of product as ${title}`;
    default: return `similar to ${title}`;
  }
}

function card(item, { withSimilar = true } = {}) {
  state.titles.set(item.item_id, item.title);
  const pick = el("button", { type: "button", class: "pick", "data-item": item.item_id,
                              "aria-label": `add ${item.title} to the session`, onclick: () => addToSession(item.item_id) },
    image(item.item_id, item.title), el("span", { class: "title" }, item.title),
    el("span", { class: "attrs" }, describe(item.attributes)),
    el("span", { class: "score" }, `score ${item.score.toFixed(3)}${item.attributes?.cold ? " · new" : ""}`));
  const reason = el("div", { class: "reason" });
  if (item.reason.because_of != null) reason.append(image(item.reason.because_of, item.reason.because_of_title, 64));
  reason.append(el("span", {}, reasonText(item.reason)));
  const node = el("article", { class: "card", "data-item": item.item_id, "data-attributes": JSON.stringify(item.attributes || {}) },
    pick, reason);
  if (withSimilar) node.append(el("button", { type: "button", class: "more", onclick: () => openDetail(item.item_id) },
    "Similar products"));
  return node;
}

function chip(id, removable) {
  const title = state.titles.get(id) || `item ${id}`;
  const node = el("div", { class: removable ? "chip" : "chip before", "data-item": id }, image(id, title, 128),
    el("span", {}, title.length > 28 ? `${title.slice(0, 27)}…` : title));
  if (removable) node.append(el("button", { type: "button", class: "remove", "aria-label": `remove ${title}`,
                                            onclick: () => removeFromSession(id) }, "×"));
  return node;
}

function renderSession() {
  $("session").hidden = false;
  $("who").textContent = state.userId != null ? `user ${state.userId}` : "anonymous";
  $("before-title").hidden = state.before.length === 0;
  $("viewed-before").replaceChildren(...state.before.map((id) => chip(id, false)));
  $("session-items").replaceChildren(...state.session.map((id) => chip(id, true)));
  $("session-empty").hidden = state.session.length > 0;
}

function currentFilters() {
  const filters = {};
  for (const select of $("filter-form").querySelectorAll("select")) if (select.value) filters[select.name] = select.value;
  for (const [column] of Object.entries(state.facets?.numeric || {})) {
    const low = $(`min-${column}`).value, high = $(`max-${column}`).value;
    if (low !== "" || high !== "") filters[column] = { min: low === "" ? null : Number(low), max: high === "" ? null : Number(high) };
  }
  if ($("new-arrivals")?.checked) filters.cold = true;
  return filters;
}

async function refresh() {
  const body = { k: K, exclude_seen: true, filters: currentFilters() };
  if (state.userId != null) body.user_id = state.userId;
  if (state.session.length) body.history = state.session;
  state.busy += 1;
  document.body.dataset.busy = String(state.busy);
  const asked = ++state.asked;  // answers can arrive out of order: only the latest request's is shown
  try {
    const answer = await api("POST", "/recommend", body);
    if (asked !== state.asked) return;
    showError("");
    $("recommendations").hidden = false;
    $("strategy").textContent = answer.strategy === "history" ? "" : `(${answer.strategy}: no history yet)`;
    const cards = answer.items.map((item) => card(item));
    $("grid").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted" }, "Nothing matches these filters.")]));
  } catch (error) {
    if (asked === state.asked) showError(`Could not get recommendations: ${error.message}`);
  } finally {
    state.busy -= 1;
    document.body.dataset.busy = String(state.busy);
  }
}

function addToSession(id) {
  state.session = [...state.session.filter((x) => x !== id), id];
  renderSession();
  refresh();
}

function removeFromSession(id) {
  state.session = state.session.filter((x) => x !== id);
  renderSession();
  refresh();
}

async function start(userId) {
  state.userId = userId;
  state.session = [];
  state.before = [];
  if (userId != null) {
    const history = await api("GET", `/users/${encodeURIComponent(userId)}/history?limit=10`);
    for (const item of history.items) state.titles.set(item.item_id, item.title);
    state.before = history.items.map((item) => item.item_id);
  }
  renderSession();
  $("filters").hidden = false;
  $("detail").hidden = true;
  await refresh();
}

async function openDetail(id) {
  try {
    const [item, similar] = await Promise.all([api("GET", `/items/${encodeURIComponent(id)}`),
                                            api("GET", `/items/${encodeURIComponent(id)}/similar?k=8`)]);
    $("detail-title").textContent = item.title;
    $("detail-body").replaceChildren(image(id, item.title, 400),
      el("div", {}, el("p", {}, describe(item.attributes)),
        el("button", { type: "button", onclick: () => addToSession(id) }, "Add to session")));
    $("similar").replaceChildren(...similar.items.map((s) => card(s, { withSimilar: false })));
    $("detail").hidden = false;
    $("detail").scrollIntoView({ behavior: "smooth" });
  } catch (error) {
    showError(`Could not open the product: ${error.message}`);
  }
}

function buildFilters(facets) {
  const form = $("filter-form");
  for (const [column, values] of Object.entries(facets.categorical)) {
    const select = el("select", { id: `filter-${column}`, name: column, onchange: refresh },
      el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, v)));
    form.append(el("label", { for: `filter-${column}` }, column), select);
  }
  for (const [column, range] of Object.entries(facets.numeric)) {
    const bound = (side, value) => el("input", { id: `${side}-${column}`, type: "number", step: "any",
      placeholder: `${side} ${Number(value).toFixed(0)}`, "aria-label": `${column} ${side}`, onchange: refresh });
    form.append(el("span", {}, column), bound("min", range.min), bound("max", range.max));
  }
  form.append(el("label", {}, el("input", { type: "checkbox", id: "new-arrivals", onchange: refresh }), " new arrivals only"));
}

async function connect() {
  try {
    const [ready, facets] = await Promise.all([api("GET", "/readyz"), api("GET", "/catalog/facets")]);
    $("status").textContent = `${ready.items.toLocaleString()} products, ${ready.users.toLocaleString()} shoppers`;
    state.facets = facets;
    $("user-ids").replaceChildren(...facets.example_user_ids.map((u) => el("option", { value: u })));
    buildFilters(facets);
    showError("");
  } catch (error) {  // a missing or wrong token: the token form says so
    showError(error.status === 401 || error.status === 403 ? "" : `The recommender is not reachable: ${error.message}`);
  }
}

async function init() {
  await connect();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    state.token = value;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    $("token-form").hidden = true;
    if (!state.facets) return connect();  // then the pictures and answers shown so far are fetched again
    if (!$("session").hidden) {
      renderSession();
      refresh();
    }
  });
  $("user-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("user-id").value.trim();
    // a catalogue prepared from a shop's files names users by the shop's own (string) ids
    const shopIds = state.facets && state.facets.id_kind === "string";
    if (!value) return showError("Enter a user id.");
    if (!shopIds && !/^\d+$/.test(value)) return showError("A user id is a whole number.");
    start(shopIds ? value : Number(value)).catch((error) => showError(`Could not open user ${value}: ${error.message}`));
  });
  $("anonymous").addEventListener("click", () => start(null).catch((error) => showError(error.message)));
  $("clear").addEventListener("click", () => { state.session = []; renderSession(); refresh(); });
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
}

init();
