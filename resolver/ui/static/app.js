// The console (docs/console.md).  No framework, no dependency: DOM built with
// createElement (never innerHTML: every record field is untrusted text), hash routes
// (#/tree, #/resource/<cpid>, #/discover?<query>, #/log, #/claims).
import {
  b64decode, b64urlKey, contains, kidOf, leafHash, parseCpid, parseVkey, sha256, toHex,
  utf8, verifyBundle, verifyCheckpoint, verifyInclusion, equalBytes,
} from "./verify.js";

const state = {
  anchor: null, // {subject, public_key, kid, source}
  served: null, // GET /v1/anchor
  vkeys: [],
  token: null, // the claims token: memory only, never stored
  namespaces: null,
  entries: new Map(), // cpid -> discover/watch view
  watch: null,
  note: "", // a message for the next claims listing
};

// -- small DOM helpers --

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);
function say(id, text, cls = "") {
  const el = $(id);
  el.textContent = text;
  el.className = cls;
}
function table(head, rows, caption) {
  return h("div", { class: "scroll" },
    h("table", {},
      caption ? h("caption", { class: "muted" }, caption) : null,
      h("thead", {}, h("tr", {}, head.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))))));
}
function time(t) {
  return t ? new Date(t * 1000).toISOString().replace(".000Z", "Z") : "";
}

async function getJSON(url, opts = {}) {
  const resp = await fetch(url, opts);
  const text = await resp.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!resp.ok) {
    const msg = body?.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${resp.status}`;
    const err = new Error(msg);
    err.status = resp.status;
    throw err;
  }
  return body;
}

// -- the trust anchor --

async function pin(anchor, source) {
  const raw = b64urlKey(anchor.public_key);
  const kid = await kidOf(raw);
  const fp = toHex(await sha256(raw)).match(/.{4}/g).slice(0, 8).join(" ");
  state.anchor = { subject: anchor.subject, public_key: anchor.public_key, kid, source };
  say("anchor-state", `Pinned anchor ${anchor.subject}, kid ${kid} (SHA-256 ${fp}…), from ${source}.`);
  $("anchor-state").dataset.kid = kid;
  route();
}

async function loadServedAnchor() {
  state.served = await getJSON("/v1/anchor");
  state.vkeys = [];
  for (const v of state.served.log_vkeys || []) {
    try {
      state.vkeys.push(parseVkey(v));
    } catch {
      /* shown as unknown key on the log view */
    }
  }
  if (state.served.log_vkeys?.length && !$("vkey").value) $("vkey").value = state.served.log_vkeys[0];
}

$("anchor-served").addEventListener("click", async () => {
  if (!state.served) await loadServedAnchor();
  await pin(state.served.anchors[0], "the resolver (/v1/anchor): compare the kid with your anchor file");
});
$("anchor-file").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const obj = JSON.parse(await file.text());
    const a = Array.isArray(obj) ? obj[0] : obj;
    if (a?.type !== "anchor.v1") throw new Error("not an anchor.v1 document");
    await pin(a, `the file ${file.name}`);
  } catch (e) {
    say("anchor-state", `That file is not an anchor: ${e.message}`, "bad");
  }
});

// -- routing --

const VIEWS = ["tree", "resource", "discover", "log", "claims"];

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [head, ...rest] = hash.split("/");
  const [name, query] = head.split("?");
  const view = VIEWS.includes(name) ? name : "tree";
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#/${view}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (view === "resource") {
    const cpid = decodeURIComponent(rest.join("/"));
    if (cpid) {
      $("res-cpid").value = cpid;
      showResource(cpid);
    }
  } else if (view === "discover") {
    runDiscover(new URLSearchParams(query || location.hash.split("?")[1] || ""));
  } else if (view === "log") {
    showLog();
  } else if (view === "claims") {
    listClaims();
  }
}
window.addEventListener("hashchange", route);

// -- 1. the resource page --

$("res-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  go(`#/resource/${$("res-cpid").value.trim().toUpperCase()}`);
});

// to `hash`; the same address again runs its view again (a new lookup, a new search)
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function cpidParts(cp, raw) {
  if (cp.error) return h("p", { class: "bad" }, `${raw} is not a CPID: ${cp.error}`);
  const check = cp.checkOk
    ? h("span", { class: "ok" }, `${cp.check} ✓ right (MOD 37,36 recomputed here)`)
    : h("span", { class: "bad" }, `${cp.check} ✗ wrong: the check character should be ${cp.expectedCheck}`);
  return table(["part", "value"], [
    ["root (country)", cp.root],
    ["region", cp.region || "—"],
    ["industry node", cp.node || "—"],
    ["kind", cp.kind],
    ["serial", h("code", {}, cp.serial)],
    ["check character", h("span", { id: "check-char", "data-ok": String(cp.checkOk) }, check)],
  ], "CPID parts");
}

let resourceSeq = 0;
async function showResource(cpid) {
  const seq = ++resourceSeq;
  const body = $("res-body");
  body.replaceChildren();
  const verdict = $("verdict");
  verdict.dataset.state = "pending";
  say("verdict", "Checking…");
  const cp = parseCpid(cpid);
  body.append(h("h3", {}, "CPID"), cpidParts(cp, cpid));
  if (!state.anchor) {
    say("verdict", "✗ NOT verified: no anchor pinned (load an anchor file, or use the resolver's).", "verdict-bad");
    verdict.dataset.state = "failed";
    return;
  }
  let bundle;
  try {
    bundle = await getJSON(`/v1/resources/${encodeURIComponent(cpid).replace(/%2F/gi, "/")}`);
  } catch (e) {
    say("verdict", `✗ NOT verified: the resolver answered ${e.message}`, "verdict-bad");
    verdict.dataset.state = "failed";
    return;
  }
  let result;
  try {
    result = await verifyBundle(bundle, state.anchor);
  } catch (e) {
    result = { ok: false, why: `malformed answer: ${e.message}`, steps: [], record: null };
  }
  if (seq !== resourceSeq) return;
  if (result.ok && result.record.cpid !== cp.text) {
    result = { ...result, ok: false, why: `the resolver answered with the record of ${result.record.cpid}` };
  }
  verdict.dataset.state = result.ok ? "verified" : "failed";
  if (result.ok) {
    say("verdict", `✓ Verified in your browser against anchor ${state.anchor.kid}.`, "verdict-ok");
  } else {
    say("verdict", `✗ NOT verified: ${result.why}`, "verdict-bad");
  }
  body.append(
    h("h3", {}, "Chain, from the national anchor down"),
    h("ol", { class: "steps", id: "chain-steps" },
      result.steps.map((s) => h("li", { class: s.ok ? "ok" : "bad", "data-ok": String(s.ok) },
        `${s.ok ? "✓" : "✗"} ${s.what}${s.why ? ": " + s.why : ""}`))),
  );
  if (!result.ok) return; // nothing of an unverified record is shown as fact
  const rec = result.record;
  const st = result.status;
  body.append(
    h("h3", {}, "Live status"),
    h("p", { id: "live-state" },
      bundle.live ? "live" : "not live",
      st ? ` — node reports ${st.state}, ${st.capacity.accelerators_free} accelerators free, observed ${new Date(st.observed_at).toISOString()}` : " — no status"),
    h("h3", {}, "Record"),
    table(["field", "value"], [
      ["kind", rec.kind],
      ["issuer", rec.issuer],
      ["version", rec.version],
      ["valid", `${time(rec.issued_at)} – ${time(rec.expires_at)}`],
      ["region / site", `${rec.location.region}${rec.location.site ? " / " + rec.location.site : ""}`],
      ["node key", h("code", {}, rec.public_key)],
      ["accelerators", (rec.attributes.accelerators || []).map((a) => `${a.count} × ${a.vendor} ${a.model}`).join(", ") || "—"],
      ["labels", Object.entries(rec.labels || {}).map(([k, v]) => `${k}:${v}`).join(" ") || "—"],
    ]),
    h("h3", {}, "Endpoints"),
    table(["proto", "host", "port", "purpose"],
      (rec.endpoints || []).map((e) => [e.proto, e.host, e.port, e.purpose || ""])),
    h("h3", {}, "Transparency log"),
    h("p", { id: "inclusion", role: "status" }, "Checking the inclusion proof…"),
    claimButton(rec.cpid),
  );
  checkInclusion(bundle.record, rec);
}

// the record's inclusion in the log, against a checkpoint verified here
async function checkInclusion(envelope, rec) {
  const el = $("inclusion");
  const out = (ok, text) => {
    el.textContent = `${ok ? "✓" : "✗"} ${text}`;
    el.className = ok ? "ok" : "bad";
    el.dataset.ok = String(ok);
  };
  try {
    const cp = await latestCheckpoint();
    if (!cp.ok) return out(false, `no verified checkpoint: ${cp.why}`);
    const digest = toHex(await sha256(utf8(JSON.stringify(envelope))));
    const p = await getJSON(`/v1/log/proof/inclusion?cpid=${encodeURIComponent(rec.cpid)}&digest=${digest}&tree_size=${cp.size}`);
    const leaf = b64decode(p.leaf);
    const entry = JSON.parse(new TextDecoder().decode(leaf));
    if (entry.cpid !== rec.cpid || entry.digest !== digest) return out(false, "the log entry names another record");
    const lh = await leafHash(leaf);
    if (!equalBytes(lh, b64decode(p.leaf_hash))) return out(false, "the leaf hash does not match the leaf");
    const ok = await verifyInclusion(p.leaf_index, p.tree_size, lh, p.proof.map(b64decode), b64decode(cp.root));
    if (!ok) return out(false, `the inclusion proof does not lead to the root of the checkpoint of size ${cp.size}`);
    out(true, `In the log: entry ${p.leaf_index} (${entry.op}, version ${entry.version}) of the tree of size ${cp.size}, proof verified here against the signed checkpoint.`);
  } catch (e) {
    out(false, `not checked: ${e.message}`);
  }
}

// -- 4. the transparency log --

async function latestCheckpoint() {
  const keys = [];
  const typed = $("vkey").value.trim();
  if (typed) {
    try {
      keys.push(parseVkey(typed));
    } catch (e) {
      return { ok: false, why: `the verifier key: ${e.message}` };
    }
  }
  if (!keys.length) return { ok: false, why: "no log verifier key (paste the log's .vkey on the log view)" };
  const resp = await fetch("/v1/log/checkpoint");
  if (!resp.ok) return { ok: false, why: `the resolver answered HTTP ${resp.status}` };
  const note = await resp.text();
  const v = await verifyCheckpoint(note, keys, keys[0].name);
  return { ...v, note };
}

async function showLog() {
  say("log-state", "Checking…");
  const v = await latestCheckpoint();
  $("log-note").textContent = v.note || "";
  $("log-state").dataset.ok = String(v.ok);
  if (v.ok) {
    say("log-state", `✓ Checkpoint verified in your browser: ${v.origin}, tree size ${v.size}, root ${v.root}, signed ${time(v.timestamp)}.`, "verdict-ok");
  } else {
    say("log-state", `✗ Checkpoint NOT verified: ${v.why}`, "verdict-bad");
  }
  $("log-state").dataset.ok = String(v.ok);
}
$("log-refresh").addEventListener("click", showLog);

// -- 2. the live tree --

function nsNodes() {
  const seedsNs = state.namespaces;
  const names = new Map();
  if (seedsNs) {
    names.set(seedsNs.root.prefix, seedsNs.root.name);
    for (const r of seedsNs.regions) names.set(r.prefix, r.name);
    for (const r of seedsNs.industry) names.set(r.prefix, r.name);
  }
  for (const e of state.entries.values()) {
    const prefix = e.cpid.split("/")[0];
    const segs = prefix.split(".");
    for (let i = 1; i <= segs.length; i++) {
      const p = segs.slice(0, i).join(".");
      if (!names.has(p)) names.set(p, "");
    }
  }
  return names;
}

function summarize(prefix) {
  let count = 0, live = 0;
  const models = new Map(); // model -> {free, claimed}
  for (const e of state.entries.values()) {
    if (!contains(prefix, e.cpid.split("/")[0])) continue;
    count++;
    if (e.live) live++;
    for (const a of e.record.attributes?.accelerators || []) {
      const m = models.get(a.model) || { free: 0, claimed: 0 };
      m.free += e.free || 0;
      m.claimed += e.claimed || 0;
      models.set(a.model, m);
    }
  }
  return { count, live, models };
}

function renderTree() {
  const names = nsNodes();
  const all = [...names.keys()].sort();
  const parentOf = (p) => {
    let best = null;
    for (const q of all) if (q !== p && contains(q, p) && (!best || q.length > best.length)) best = q;
    return best;
  };
  const kids = new Map();
  for (const p of all) {
    const parent = parentOf(p);
    if (!kids.has(parent)) kids.set(parent, []);
    kids.get(parent).push(p);
  }
  const node = (p) => {
    const s = summarize(p);
    const models = [...s.models].map(([m, v]) => `${m}: ${v.free} free, ${v.claimed} claimed`).join("; ");
    const own = [...state.entries.values()].filter((e) => e.cpid.split("/")[0] === p).sort((a, b) => a.cpid.localeCompare(b.cpid));
    return h("li", { "data-prefix": p, "data-count": s.count, "data-live": s.live },
      h("span", { class: "ns" }, p), names.get(p) ? ` ${names.get(p)}` : "",
      " ", h("span", { class: "counts" }, `${s.count} resources, ${s.live} live${models ? "; " + models : ""}`),
      (own.length || kids.get(p)) ? h("ul", {},
        own.map((e) => h("li", { class: "res", "data-cpid": e.cpid },
          h("a", { href: `#/resource/${e.cpid}` }, e.cpid), e.live ? " (live)" : " (not live)")),
        (kids.get(p) || []).map(node)) : null);
  };
  $("tree").replaceChildren(h("div", { class: "tree" }, h("ul", {}, (kids.get(null) || []).map(node))));
}

const TREE_LIMIT = 500; // the resolver's default discover_max_limit

async function relist() {
  const d = await getJSON(`/v1/discover?limit=${TREE_LIMIT}`);
  state.entries = new Map(d.results.map((r) => [r.cpid, r]));
  state.truncated = d.results.length >= TREE_LIMIT;
  renderTree();
  return d.revision;
}
function liveNote() {
  return state.truncated ? ` Only the first ${TREE_LIMIT} resources are counted.` : "";
}

async function startTree() {
  try {
    state.namespaces = await getJSON("/v1/ui/namespaces");
  } catch {
    state.namespaces = null;
  }
  const revision = await relist();
  say("tree-state", `Live from revision ${revision}: following /v1/watch.${liveNote()}`);
  openWatch(revision);
}

function openWatch(revision) {
  if (state.watch) state.watch.close();
  const es = new EventSource(`/v1/watch?since=${revision}`);
  state.watch = es;
  es.addEventListener("put", (ev) => {
    const d = JSON.parse(ev.data);
    state.entries.set(d.cpid, d);
    renderTree();
  });
  es.addEventListener("delete", (ev) => {
    const d = JSON.parse(ev.data);
    state.entries.delete(d.cpid);
    renderTree();
  });
  es.addEventListener("relist", async () => {
    es.close();
    const rev = await relist();
    openWatch(rev);
  });
  es.addEventListener("open", () => say("tree-state", `Live: following /v1/watch.${liveNote()}`));
  es.addEventListener("error", () => {
    if (es.readyState !== EventSource.CLOSED) {
      say("tree-state", "The watch is reconnecting…");
      return;
    }
    // EventSource gives up on an HTTP error (e.g. 429 too_many_watches, 503): list again
    // and reopen after a pause, so the tree never silently stops following
    say("tree-state", "The watch was refused; trying again in 3 s…");
    setTimeout(async () => {
      if (state.watch !== es) return; // replaced meanwhile
      try {
        openWatch(await relist());
      } catch {
        openWatch(0);
      }
    }, 3000);
  });
}

// -- 3. discovery --

const FIELDS = ["kind", "accelerator", "within", "near", "max_latency_ms", "min_free", "live", "limit", "sort", "weights"];

// why a result ranks where it does: the keys the resolver compared, in order (not the CPID)
function why(rank) {
  if (!rank) return "—";
  return rank.keys.filter((k) => k.name !== "cpid")
    .map((k) => `${k.name} ${k.value ?? "none"} ${k.order === "asc" ? "↑" : "↓"}`).join(", ");
}

$("disc-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = new URLSearchParams();
  for (const f of FIELDS) {
    const v = $("disc-form").elements[f].value.trim();
    if (v) q.append(f, v);
  }
  for (const l of $("d-labels").value.split(/[\s,]+/).filter(Boolean)) q.append("label", l);
  go(`#/discover?${q}`);
});

let discoverSeq = 0;
async function runDiscover(q) {
  const seq = ++discoverSeq;
  const form = $("disc-form");
  for (const f of FIELDS) form.elements[f].value = q.get(f) ?? (f === "limit" ? "20" : "");
  $("d-labels").value = q.getAll("label").join(" ");
  if ([...q.keys()].length === 0) {
    say("disc-state", "Choose filters and search; the query goes in the page address, to share.");
    $("disc-results").replaceChildren();
    return;
  }
  say("disc-state", "Searching…");
  try {
    const d = await getJSON(`/v1/discover?${q}`);
    if (seq !== discoverSeq) return;
    const order = d.ranking ? `, order ${d.ranking.sort}, scores ${d.ranking.function}` : "";
    say("disc-state", `${d.results.length} results, best first (revision ${d.revision}${order}).`);
    $("disc-results").replaceChildren(table(
      ["#", "CPID", "score", "L2 (0–10)", "free", "latency (ms)", "CNY/unit-hour", "accelerators", "live", "ranked by", "claim"],
      d.results.map((r, i) => [
        i + 1,
        h("a", { href: `#/resource/${r.cpid}`, class: "mono" }, r.cpid),
        r.score.toFixed(3),
        r.rank?.score?.l2 ?? "—",
        r.free,
        r.latency_ms ?? "—",
        r.record.attributes?.price_cny_per_unit_hour ?? "—",
        (r.record.attributes?.accelerators || []).map((a) => `${a.count} × ${a.model}`).join(", ") || "—",
        r.live ? "yes" : "no",
        why(r.rank),
        claimButton(r.cpid),
      ]), "Discovery results"));
  } catch (e) {
    say("disc-state", `The query was refused: ${e.message}`, "bad");
    $("disc-results").replaceChildren();
  }
}

// -- 5. claims (the token lives in `state.token` only) --

function auth() {
  return { Authorization: `Bearer ${state.token}` };
}

function claimButton(cpid) {
  return h("button", {
    type: "button", class: "secondary", "data-claim": cpid, "aria-label": `Claim units of ${cpid}`,
    onclick: () => makeClaim(cpid),
  }, "Claim");
}

async function makeClaim(cpid) {
  if (!state.token) {
    location.hash = "#/claims";
    say("claims-state", `Paste a claims token first, then claim ${cpid} again.`, "bad");
    $("claims-token").focus();
    return;
  }
  const units = Number($("claim-units").value || 1);
  const ttl = Number($("claim-ttl").value || 600);
  try {
    const c = await getJSON("/v1/claims", {
      method: "POST",
      headers: { ...auth(), "Content-Type": "application/json" },
      body: JSON.stringify({ cpid, units, ttl_s: ttl }),
    });
    showClaims(`Claimed ${c.units} units of ${c.cpid} until ${time(c.expires_at)} (claim ${c.claim_id}).`);
  } catch (e) {
    showClaims(`The claim of ${cpid} was refused: ${e.message}.`);
  }
}

// switch to the claims view, which lists the claims with `note` in front (one listing)
function showClaims(note) {
  state.note = note;
  if (location.hash !== "#/claims") location.hash = "#/claims";
  else listClaims();
}

async function listClaims(given = "") {
  const note = given || state.note || "";
  state.note = "";
  if (!state.token) {
    $("claims-list").replaceChildren();
    return;
  }
  try {
    const d = await getJSON("/v1/claims", { headers: auth() });
    say("claims-state", `${note ? note + " " : ""}Holder ${d.holder}: ${d.claims.length} claims, ${d.units} units.`);
    $("claims-list").replaceChildren(table(["claim", "CPID", "units", "expires", "release"],
      d.claims.map((c) => [
        h("code", {}, c.claim_id),
        h("a", { href: `#/resource/${c.cpid}` }, c.cpid),
        c.units,
        time(c.expires_at),
        h("button", { type: "button", "aria-label": `Release claim ${c.claim_id}`, "data-release": c.claim_id, onclick: () => release(c.claim_id) }, "Release"),
      ]), "Your claims"));
  } catch (e) {
    say("claims-state", `Could not list claims: ${e.message}`, "bad");
  }
}

async function release(id) {
  try {
    await getJSON(`/v1/claims/${encodeURIComponent(id)}`, { method: "DELETE", headers: auth() });
    await listClaims(`Released ${id}.`);
  } catch (e) {
    say("claims-state", `The release was refused: ${e.message}`, "bad");
  }
}

$("claims-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("claims-token").value.trim() || null;
  $("claims-token").value = ""; // not left in the DOM either
  if (state.token) listClaims();
  else say("claims-state", "No token.");
});
$("claims-forget").addEventListener("click", () => {
  state.token = null;
  $("claims-list").replaceChildren();
  say("claims-state", "Token forgotten.");
});

// -- start --

(async () => {
  try {
    await loadServedAnchor();
  } catch (e) {
    say("anchor-state", `The resolver serves no anchor (${e.message}); load an anchor file.`, "bad");
  }
  route();
  startTree().catch((e) => say("tree-state", `The tree could not load: ${e.message}`, "bad"));
})();
