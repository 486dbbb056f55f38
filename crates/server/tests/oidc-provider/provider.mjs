// A real OAuth 2.0 / OpenID provider (panva's certified oidc-provider) for keyplane's OIDC tests:
// client_credentials grants issue JWT access tokens (RFC 9068 `at+jwt`), keys at /jwks, discovery
// at /.well-known/openid-configuration. Listens on 127.0.0.1 only.
//
// Environment:
//   PORT       port to listen on; 0 picks a free one (restart on the same port to keep the issuer)
//   KEYS_FILE  private JWKS; created with fresh RS256 and ES256 keys if missing, so deleting it
//              and restarting rotates the keys
//   AUDIENCE   the `aud` of access tokens (default https://api.keyplane.test)
//   CONSOLE_REDIRECT_URI  when set, also a public client `keyplane-console` for the web console's
//              authorization code flow with PKCE, redirecting there; the provider's development
//              login and consent pages (any login name is accepted, and becomes the `sub`) are on
//              only then
//
// Each client is a user: its client_id is the token's `sub` and its secret is `<client_id>-secret`.
// Resources (the `resource` token parameter):
//   (none)                          ES256 token for AUDIENCE
//   https://rs256.keyplane.test     RS256 token for AUDIENCE
//   https://other.keyplane.test     ES256 token for another audience
//
// Prints `listening on <issuer>` once ready, then one `request <METHOD> <path>` line per request.
import * as fs from 'node:fs';
import * as http from 'node:http';
import Provider, { errors } from 'oidc-provider';
import { exportJWK, generateKeyPair } from 'jose';

const KEYS_FILE = process.env.KEYS_FILE;
if (!KEYS_FILE) throw new Error('KEYS_FILE is required');
const AUDIENCE = process.env.AUDIENCE || 'https://api.keyplane.test';
const RS256_RESOURCE = 'https://rs256.keyplane.test';
const OTHER_RESOURCE = 'https://other.keyplane.test';
const USERS = ['alice', 'bob', 'carol', 'dave'];

async function privateJwk(alg) {
  const { privateKey } = await generateKeyPair(alg, { extractable: true });
  const kid = `${alg.toLowerCase()}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  return { ...(await exportJWK(privateKey)), alg, kid, use: 'sig' };
}

if (!fs.existsSync(KEYS_FILE)) {
  // Written beside, then renamed: a reader never sees half a key set.
  const jwks = { keys: [await privateJwk('ES256'), await privateJwk('RS256')] };
  fs.writeFileSync(`${KEYS_FILE}.tmp`, JSON.stringify(jwks), { mode: 0o600 });
  fs.renameSync(`${KEYS_FILE}.tmp`, KEYS_FILE);
}
const jwks = JSON.parse(fs.readFileSync(KEYS_FILE, 'utf8'));

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(process.env.PORT || 0), '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const resource = (audience, alg) => ({
  scope: 'keyplane',
  audience,
  accessTokenTTL: 300,
  accessTokenFormat: 'jwt',
  jwt: { sign: { alg } },
});

const CONSOLE_REDIRECT_URI = process.env.CONSOLE_REDIRECT_URI;
const clients = USERS.map((id) => ({
  client_id: id,
  client_secret: `${id}-secret`,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
}));
if (CONSOLE_REDIRECT_URI) {
  clients.push({
    client_id: 'keyplane-console',
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: [CONSOLE_REDIRECT_URI],
    token_endpoint_auth_method: 'none',
  });
}

const provider = new Provider(issuer, {
  jwks,
  clients,
  scopes: ['openid', 'keyplane'],
  features: {
    devInteractions: { enabled: Boolean(CONSOLE_REDIRECT_URI) },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => AUDIENCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, indicator) => {
        if (indicator === AUDIENCE) return resource(AUDIENCE, 'ES256');
        if (indicator === RS256_RESOURCE) return resource(AUDIENCE, 'RS256');
        if (indicator === OTHER_RESOURCE) return resource(OTHER_RESOURCE, 'ES256');
        throw new errors.InvalidTarget();
      },
    },
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

const callback = provider.callback();
server.on('request', (req, res) => {
  console.log(`request ${req.method} ${req.url}`);
  callback(req, res);
});
console.log(`listening on ${issuer}`);
process.on('SIGTERM', () => process.exit(0));
