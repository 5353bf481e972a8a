// Runs resolver/ui/static/verify.js over tests/vectors/ed25519.json (Node's WebCrypto):
// prints one line per case whose signature or key verdict differs, and "ok N" at the end.
import { readFileSync } from "node:fs";
import { verifyEd25519, keyProblem, hexBytes } from "../../resolver/ui/static/verify.js";

const file = new URL("../vectors/ed25519.json", import.meta.url);
const { cases } = JSON.parse(readFileSync(file, "utf8"));
let bad = 0;
for (const c of cases) {
  const pub = hexBytes(c.public_key_hex);
  const v = await verifyEd25519(pub, hexBytes(c.signature_hex), hexBytes(c.message_hex));
  const sig = v.ok ? "accept" : "reject";
  const key = pub.length === 32 && keyProblem(pub) === null ? "accept" : "reject";
  if (sig !== c.verify || key !== c.key.verdict) {
    bad++;
    console.log(`${c.id}: signature ${sig} (want ${c.verify}), key ${key} (want ${c.key.verdict}) ${v.why}`);
  }
}
console.log(bad ? `failed ${bad}` : `ok ${cases.length}`);
