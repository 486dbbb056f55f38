// Hand-made tokens for the rejection tests, signed with jose, the library the provider signs with.
// Usage: node sign.mjs '<spec JSON>'   → prints one compact JWS
//   spec.keys_file   the provider's private JWKS (KEYS_FILE)
//   spec.alg         ES256 or RS256: signs with the provider's key for that algorithm
//   spec.fresh_key   true: sign with a new key the provider never published (same kid unless
//                    spec.header.kid overrides it)
//   spec.hmac_with_public_key  true: HS256 with the provider's RSA public key (PEM) as the secret,
//                    the classic algorithm-confusion attack
//   spec.header      extra protected header members (override typ, kid, ...)
//   spec.claims      the payload
import * as fs from 'node:fs';
import { SignJWT, exportSPKI, generateKeyPair, importJWK } from 'jose';

const spec = JSON.parse(process.argv[2]);
const { keys } = JSON.parse(fs.readFileSync(spec.keys_file, 'utf8'));
const published = keys.find((k) => k.alg === (spec.hmac_with_public_key ? 'RS256' : spec.alg));
const header = { alg: spec.alg, typ: 'at+jwt', kid: published.kid, ...(spec.header || {}) };

let key;
if (spec.hmac_with_public_key) {
  const { d, p, q, dp, dq, qi, ...publicJwk } = published;
  const pem = await exportSPKI(await importJWK(publicJwk, 'RS256'));
  header.alg = 'HS256';
  key = new TextEncoder().encode(pem);
} else if (spec.fresh_key) {
  key = (await generateKeyPair(spec.alg)).privateKey;
} else {
  key = await importJWK(published, spec.alg);
}
console.log(await new SignJWT(spec.claims).setProtectedHeader(header).sign(key));
