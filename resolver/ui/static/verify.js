// Verification in the browser (docs/console.md): Ed25519 with libsodium's rules,
// DSSE PAE, CPIDs, the trust chain (docs/protocol.md §5), signed notes and RFC 6962
// inclusion proofs.  WebCrypto does the signature equation; the checks WebCrypto does
// not make (docs/verification.md §1, §2) are made here first, with BigInt arithmetic.

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

export const P = 2n ** 255n - 19n;
export const L = 2n ** 252n + 27742317777372353535851937790883648493n;
const D = (-121665n * inv(121666n)) % P + P;
const SQRT_M1 = pow(2n, (P - 1n) / 4n);
// y of the order-8 points (the other one is P - C8): libsodium's blocklist entry 26e8958f...
const C8 = leInt(hexBytes("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"));
const SMALL_ORDER_Y = [0n, 1n, P - 1n, C8, P - C8];

function mod(a) {
  const r = a % P;
  return r < 0n ? r + P : r;
}
function pow(b, e) {
  let r = 1n;
  b = mod(b);
  while (e > 0n) {
    if (e & 1n) r = (r * b) % P;
    b = (b * b) % P;
    e >>= 1n;
  }
  return r;
}
function inv(a) {
  return pow(a, P - 2n);
}

export function hexBytes(hex) {
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(i * 2, 2), 16);
  return out;
}
export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
function leInt(bytes) {
  let n = 0n;
  for (let i = bytes.length - 1; i >= 0; i--) n = (n << 8n) | BigInt(bytes[i]);
  return n;
}
export function utf8(text) {
  return enc.encode(text);
}
export function fromUtf8(bytes) {
  return dec.decode(bytes);
}
export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
export function equalBytes(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

// base64: standard or URL-safe, padding optional (docs/protocol.md §3); anything else throws
export function b64decode(text) {
  if (!/^[A-Za-z0-9+/_-]*={0,2}$/.test(text)) throw new Error("not base64");
  let s = text.replace(/=+$/, "").replace(/-/g, "+").replace(/_/g, "/");
  if (s.length % 4 === 1) throw new Error("not base64 (length)");
  s += "===".slice((s.length + 3) % 4);
  const bin = atob(s);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}
export function b64encode(bytes) {
  return btoa(String.fromCharCode(...bytes));
}
// a public key: canonical base64url without padding, 32 bytes
export function b64urlKey(text) {
  if (!/^[A-Za-z0-9_-]{43}$/.test(text)) throw new Error(`public key ${text} is not 43 base64url characters`);
  const raw = b64decode(text);
  const back = b64encode(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  if (back !== text) throw new Error(`public key ${text} is not canonical base64url`);
  return raw;
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

// -- Edwards25519 points (extended coordinates), only for the key rule's subgroup check --

function decodePoint(bytes) {
  const y = leInt(bytes) & ((1n << 255n) - 1n);
  const sign = bytes[31] >> 7;
  if (y >= P) return null;
  const y2 = (y * y) % P;
  const u = mod(y2 - 1n);
  const v = mod(D * y2 + 1n);
  let x = mod(u * pow(v, 3n) * pow(u * pow(v, 7n), (P - 5n) / 8n));
  const vx2 = mod(v * x * x);
  if (vx2 !== u) {
    if (vx2 === mod(-u)) x = mod(x * SQRT_M1);
    else return null;
  }
  if (x === 0n && sign) return null;
  if (Number(x & 1n) !== sign) x = P - x;
  return [x, y, 1n, mod(x * y)];
}
function add(p, q) {
  const [x1, y1, z1, t1] = p;
  const [x2, y2, z2, t2] = q;
  const a = mod((y1 - x1) * (y2 - x2));
  const b = mod((y1 + x1) * (y2 + x2));
  const c = mod(2n * D * t1 * t2);
  const d = mod(2n * z1 * z2);
  const e = b - a, f = d - c, g = d + c, h = b + a;
  return [mod(e * f), mod(g * h), mod(f * g), mod(e * h)];
}
function mul(n, p) {
  let r = [0n, 1n, 1n, 0n];
  let q = p;
  while (n > 0n) {
    if (n & 1n) r = add(r, q);
    q = add(q, q);
    n >>= 1n;
  }
  return r;
}
function isIdentity(p) {
  return p[0] === 0n && mod(p[1] - p[2]) === 0n;
}

// The y of an encoding (sign bit ignored), reduced mod p: small order in any encoding.
function smallOrder(bytes) {
  const y = leInt(bytes) & ((1n << 255n) - 1n);
  return SMALL_ORDER_Y.includes(y % P);
}

/** The key rule (docs/verification.md §2): null when the 32 bytes are an acceptable
 * public key, else why not. */
export function keyProblem(raw) {
  if (raw.length !== 32) return `public key is ${raw.length} bytes, expected 32`;
  const y = leInt(raw) & ((1n << 255n) - 1n);
  if (y >= P) return `public key is a non-canonical encoding (y = p + ${y - P})`;
  if (smallOrder(raw)) return "public key is a small-order point";
  const pt = decodePoint(raw);
  if (pt === null) return "public key is not a point on the curve (or x = 0 with the sign bit set)";
  if (!isIdentity(mul(L, pt))) return "public key is a point outside the prime-order subgroup";
  return null;
}

/** The one Ed25519 verdict: {ok, why}.  libsodium's rules first (S < L; A canonical, not
 * small order; R canonical, not small order), then WebCrypto's Ed25519 for the equation. */
export async function verifyEd25519(publicRaw, sig, message) {
  if (sig.length !== 64) return { ok: false, why: `signature is ${sig.length} bytes, expected 64` };
  if (publicRaw.length !== 32) return { ok: false, why: `public key is ${publicRaw.length} bytes` };
  const R = sig.subarray(0, 32);
  const S = leInt(sig.subarray(32));
  if (S >= L) return { ok: false, why: "signature scalar S is not below the group order L" };
  const ay = leInt(publicRaw) & ((1n << 255n) - 1n);
  if (ay >= P) return { ok: false, why: "public key A is not canonically encoded (y ≥ p)" };
  if (smallOrder(publicRaw)) return { ok: false, why: "public key A is a small-order point" };
  const ry = leInt(R) & ((1n << 255n) - 1n);
  if (ry >= P) return { ok: false, why: "signature R is not canonically encoded (y ≥ p)" };
  if (smallOrder(R)) return { ok: false, why: "signature R is a small-order point" };
  let key;
  try {
    key = await crypto.subtle.importKey("raw", publicRaw, { name: "Ed25519" }, false, ["verify"]);
  } catch (e) {
    return { ok: false, why: `WebCrypto refused the public key: ${e.message || e}` };
  }
  const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, sig, message);
  return ok ? { ok: true, why: "" } : { ok: false, why: "the Ed25519 equation does not hold (signature does not match)" };
}

// -- DSSE --

export function pae(type, body) {
  const t = utf8(type);
  return concat(utf8(`DSSEv1 ${t.length} `), t, utf8(` ${body.length} `), body);
}

/** Verify a DSSE envelope under one key: {ok, why, payload (object), payloadBytes}. */
export async function verifyEnvelope(env, type, publicRaw, kid) {
  const fail = (why) => ({ ok: false, why });
  if (!env || typeof env !== "object") return fail("no envelope");
  const names = Object.keys(env).sort().join(",");
  if (names !== "payload,payloadType,signatures") return fail(`envelope has members ${names}`);
  const want = `application/vnd.cpi.${type}+json`;
  if (env.payloadType !== want) return fail(`payloadType is ${env.payloadType}, expected ${want}`);
  if (!Array.isArray(env.signatures) || env.signatures.length === 0) return fail("no signatures");
  let body;
  try {
    body = b64decode(env.payload);
  } catch (e) {
    return fail(`payload: ${e.message}`);
  }
  const msg = pae(env.payloadType, body);
  let last = "no signature by this key";
  for (const s of env.signatures) {
    if (s.keyid && s.keyid !== kid) continue;
    let sig;
    try {
      sig = b64decode(s.sig);
    } catch (e) {
      last = `sig: ${e.message}`;
      continue;
    }
    const v = await verifyEd25519(publicRaw, sig, msg);
    if (v.ok) {
      let payload;
      try {
        payload = JSON.parse(fromUtf8(body));
      } catch (e) {
        return fail(`payload is not JSON: ${e.message}`);
      }
      if (payload.type !== type) return fail(`payload type is ${payload.type}, expected ${type}`);
      return { ok: true, why: "", payload, payloadBytes: body };
    }
    last = v.why;
  }
  return fail(last);
}

// -- CPIDs (docs/protocol.md §1) --

export const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const KINDS = ["CPU", "GPU", "NPU", "CLU", "STO", "NET", "SVC"];
const CPID_RE = /^([A-Z]{2}(?:\.[0-9A-Z]{1,16})*)\/([A-Z]{3})\.([0-9A-HJKMNP-TV-Z]{12})-([0-9A-Z])$/;

export function crockford(bytes, n) {
  let bits = 0n;
  for (const b of bytes) bits = (bits << 8n) | BigInt(b);
  const total = BigInt(bytes.length * 8);
  let out = "";
  for (let i = 0n; i < BigInt(n); i++) {
    const shift = total - 5n * (i + 1n);
    const v = shift >= 0n ? (bits >> shift) & 31n : (bits << -shift) & 31n;
    out += CROCKFORD[Number(v)];
  }
  return out;
}
export async function kidOf(raw) {
  return crockford(await sha256(raw), 16);
}
function value(c) {
  const n = c.charCodeAt(0);
  return n <= 57 ? n - 48 : n - 55;
}
export function checkChar(body) {
  let p = 36;
  for (const c of body) {
    let s = (p + value(c)) % 36;
    if (s === 0) s = 36;
    p = (2 * s) % 37;
  }
  const v = (37 - p) % 36;
  return v < 10 ? String(v) : String.fromCharCode(55 + v);
}

/** The parts of a CPID, with its check character recomputed ({error} if it does not parse). */
export function parseCpid(text) {
  const up = String(text).toUpperCase();
  if (up.length > 128) return { error: "longer than 128 characters" };
  const m = CPID_RE.exec(up);
  if (!m) return { error: "does not match prefix/KIND.SERIAL-CHECK" };
  const [, prefix, kind, serial, check] = m;
  if (!KINDS.includes(kind)) return { error: `unknown kind ${kind}` };
  const segments = prefix.split(".");
  const expected = checkChar(prefix.replace(/\./g, "") + kind + serial);
  return {
    text: up,
    prefix,
    segments,
    root: segments[0],
    region: segments[1] || null,
    node: segments.slice(2).join(".") || null,
    kind,
    serial,
    check,
    expectedCheck: expected,
    checkOk: check === expected,
  };
}

export function contains(outer, inner) {
  const a = outer.split("."), b = inner.split(".");
  return a.length <= b.length && a.every((s, i) => s === b[i]);
}

// -- the trust chain (docs/protocol.md §5), walked from the anchor down --

const SKEW = 60;

/** Verify a bundle {record, chain, status} against one anchor {subject, public_key}.
 * Returns {ok, why, steps: [{what, ok, why}], record, status}. */
export async function verifyBundle(bundle, anchor, now = Math.floor(Date.now() / 1000)) {
  const steps = [];
  const step = (what, ok, why = "") => {
    steps.push({ what, ok, why });
    return ok;
  };
  const done = (why) => ({ ok: !why, why, steps, record: rec, status });
  let rec = null, status = null;
  const chain = bundle.chain || [];
  if (chain.length === 0) return step("chain", false, "the chain is empty (rule 1)") || done("the chain is empty");
  if (chain.length > 8) return step("chain", false, "more than 8 certs (rule 2)") || done("the chain is longer than 8 certs");
  const anchorRaw = b64urlKey(anchor.public_key);
  const anchorKid = await kidOf(anchorRaw);
  let signer = { subject: anchor.subject, raw: anchorRaw, kid: anchorKid, scopes: ["delegate", "issue"], name: `anchor ${anchor.subject} (${anchorKid})` };
  const top = chain[chain.length - 1];
  const topKid = top?.signatures?.[0]?.keyid;
  if (topKid !== anchorKid && topKid !== "" && topKid !== undefined) {  // no keyid: tried below
    step(`anchor`, false, `the last cert is signed by ${topKid}, not by the pinned anchor ${anchorKid} (rule 2)`);
    return done(`the chain does not lead to anchor ${anchorKid}`);
  }
  step(`anchor ${anchor.subject}`, true, `kid ${anchorKid}`);
  for (let i = chain.length - 1; i >= 0; i--) {
    const link = i + 1;
    const v = await verifyEnvelope(chain[i], "cert.v1", signer.raw, signer.kid);
    const label = `cert ${link} signed by ${signer.name}`;
    if (!v.ok) {
      step(label, false, `signature: ${v.why}`);
      return done(`the signature of cert ${link} does not verify: ${v.why}`);
    }
    const c = v.payload;
    const label2 = `cert ${link}: ${c.subject} (issued by ${c.issuer})`;
    const why =
      c.issuer !== signer.subject ? `issuer ${c.issuer} is not the signer's subject ${signer.subject} (rule 2)`
      : !contains(signer.subject, c.subject) ? `${signer.subject} does not contain ${c.subject} (rule 2)`
      : !signer.scopes.includes("delegate") ? `the signer ${signer.subject} lacks scope delegate (rule 2)`
      : !(c.not_before - SKEW <= now && now <= c.not_after + SKEW) ? `outside its validity window ${c.not_before}…${c.not_after} ±60 s (rule 3)`
      : null;
    let raw = null;
    let problem = why;
    if (!problem) {
      try {
        raw = b64urlKey(c.public_key);
        problem = keyProblem(raw);
      } catch (e) {
        problem = e.message;
      }
    }
    if (!step(label2, !problem, problem ? problem : `signature verified; scopes ${c.scopes.join(", ")}`)) {
      return done(`cert ${link} (${c.subject}): ${problem}`);
    }
    const kid = await kidOf(raw);
    signer = { subject: c.subject, raw, kid, scopes: c.scopes, name: `${c.subject} (${kid})` };
  }
  const rv = await verifyEnvelope(bundle.record, "record.v1", signer.raw, signer.kid);
  if (!step(`record signed by ${signer.name}`, rv.ok, rv.ok ? "signature verified" : rv.why)) {
    return done(`the record's signature does not verify: ${rv.why}`);
  }
  rec = rv.payload;
  const cp = parseCpid(rec.cpid);
  let problem =
    cp.error ? `CPID ${rec.cpid}: ${cp.error} (rule 5)`
    : !cp.checkOk ? `CPID check character is ${cp.check}, expected ${cp.expectedCheck} (rule 5)`
    : cp.prefix !== signer.subject ? `the signer's subject ${signer.subject} is not the CPID's prefix ${cp.prefix} (rule 1)`
    : !signer.scopes.includes("issue") ? `the signer ${signer.subject} lacks scope issue (rule 1)`
    : rec.issuer !== signer.subject ? `the record's issuer ${rec.issuer} is not the signer ${signer.subject} (rule 1)`
    : !(rec.issued_at - SKEW <= now && now <= rec.expires_at + SKEW) ? `outside its validity window ${rec.issued_at}…${rec.expires_at} ±60 s (rule 3)`
    : rec.kind !== cp.kind ? `the record's kind ${rec.kind} is not the CPID's ${cp.kind} (rule 5)`
    : null;
  let nodeRaw = null;
  if (!problem) {
    try {
      nodeRaw = b64urlKey(rec.public_key);
      problem = keyProblem(nodeRaw);
      const serial = crockford(await sha256(nodeRaw), 12);
      if (!problem && serial !== cp.serial) problem = `the CPID's serial ${cp.serial} is not the key's serial ${serial} (rule 5)`;
    } catch (e) {
      problem = e.message;
    }
  }
  if (!step(`record ${rec.cpid}`, !problem, problem || "CPID, signer, validity and serial checked")) {
    return done(`record: ${problem}`);
  }
  if (bundle.status) {
    const sv = await verifyEnvelope(bundle.status, "status.v1", nodeRaw, await kidOf(nodeRaw));
    const okStatus = sv.ok && sv.payload.cpid === rec.cpid;
    step("status signed by the node's key", okStatus, sv.ok ? (okStatus ? `state ${sv.payload.state}` : "status names another CPID") : sv.why);
    if (okStatus) status = sv.payload;
  }
  return done(null);
}

// -- signed notes and RFC 6962 --

export function parseVkey(text) {
  // the base64 part may itself hold "+": split at the first two only
  const m = /^([^+\s]+)\+([0-9a-fA-F]{8})\+([A-Za-z0-9+/]+=*)$/.exec(text.trim());
  if (!m) throw new Error("a verifier key is name+hex8+base64");
  const [, name, hex, b64] = m;
  const k = b64decode(b64);
  if (k.length !== 33 || k[0] !== 1) throw new Error("verifier key is not 0x01 || 32-byte Ed25519 key");
  return { name, id: hex.toLowerCase(), raw: k.subarray(1) };
}
async function noteKeyId(name, raw) {
  const h = await sha256(concat(utf8(name), new Uint8Array([10, 1]), raw));
  return toHex(h.subarray(0, 4));
}

/** Verify a checkpoint note under verifier keys; {ok, why, origin, size, root, timestamp}. */
export async function verifyCheckpoint(noteText, vkeys, origin) {
  const split = noteText.lastIndexOf("\n\n");
  if (split < 0) return { ok: false, why: "no empty line before signatures" };
  const text = noteText.slice(0, split + 1);
  const lines = text.slice(0, -1).split("\n");
  const sigLines = noteText.slice(split + 2).split("\n").filter((l) => l);
  const [org, sizeText, rootText] = lines;
  const out = { ok: false, origin: org, size: Number(sizeText), root: rootText, timestamp: null };
  for (const l of lines.slice(3)) if (l.startsWith("cpi-timestamp ")) out.timestamp = Number(l.slice(14));
  if (!/^(0|[1-9][0-9]*)$/.test(sizeText || "")) return { ...out, why: "tree size is not a decimal number" };
  if (origin && org !== origin) return { ...out, why: `origin is ${org}, expected ${origin}` };
  let known = 0;
  for (const line of sigLines) {
    const m = /^\u2014 (\S+) (\S+)$/.exec(line);
    if (!m) return { ...out, why: `malformed signature line ${line}` };
    const blob = b64decode(m[2]);
    for (const vk of vkeys) {
      if (vk.name !== m[1] || toHex(blob.subarray(0, 4)) !== vk.id) continue;
      if ((await noteKeyId(vk.name, vk.raw)) !== vk.id) return { ...out, why: `verifier key ${vk.name} has a wrong key ID` };
      const v = await verifyEd25519(vk.raw, blob.subarray(4), utf8(text));
      if (!v.ok) return { ...out, why: `signature by ${vk.name}+${vk.id} fails: ${v.why}` };
      known++;
    }
  }
  if (!known) return { ...out, why: "no signature by a known log key" };
  return { ...out, ok: true, why: "" };
}

export async function leafHash(leaf) {
  return sha256(concat(new Uint8Array([0]), leaf));
}
async function nodeHash(l, r) {
  return sha256(concat(new Uint8Array([1]), l, r));
}

/** RFC 9162 §2.1.3.2: does `proof` put leaf `index` of a tree of `size` under `root`? */
export async function verifyInclusion(index, size, leafH, proof, root) {
  if (index >= size) return false;
  let fn = index, sn = size - 1, r = leafH;
  for (const p of proof) {
    if (sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      if (fn % 2 === 0) {
        while (fn % 2 === 0 && fn !== 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  return sn === 0 && equalBytes(r, root);
}
