// A webhook receiver for keyplane's tests: verifies every delivery with the `standardwebhooks`
// library (the Standard Webhooks reference implementation), as a receiver in production would.
// Listens on 127.0.0.1 only.
//
// Environment:
//   PORT      port to listen on; 0 picks a free one (restart on the same port to come back)
//   SECRETS   comma-separated `whsec_...` secrets; each delivery is verified with each of them
//   STATUS    the status answered to a delivery that verifies (default 204); one that verifies
//             with no secret gets 401
//   DELAY_MS  wait this long before answering (default 0)
//   TLS_CERT, TLS_KEY  PEM files: serve https with this certificate instead of http
//
// Prints `listening on <port>` once ready, then one `received <json>` line per request:
// {"id", "timestamp", "signatures", "verified": [indexes into SECRETS], "payload"}.
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { createRequire } from 'node:module';

const { Webhook } = createRequire(import.meta.url)('standardwebhooks');

const secrets = (process.env.SECRETS || '').split(',').filter(Boolean);
const status = Number(process.env.STATUS || 204);
const delay = Number(process.env.DELAY_MS || 0);

const handler = (req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString('utf8');
    const verified = [];
    secrets.forEach((secret, index) => {
      try {
        new Webhook(secret).verify(body, req.headers);
        verified.push(index);
      } catch {
        // Not signed with this secret (or too old): the test sees it in `verified`.
      }
    });
    let payload = null;
    try {
      payload = JSON.parse(body);
    } catch {
      payload = null;
    }
    const signature = req.headers['webhook-signature'] || '';
    console.log(`received ${JSON.stringify({
      method: req.method,
      id: req.headers['webhook-id'] || null,
      timestamp: req.headers['webhook-timestamp'] || null,
      signatures: signature.split(' ').filter(Boolean).length,
      verified,
      payload,
    })}`);
    setTimeout(() => {
      res.writeHead(verified.length > 0 ? status : 401);
      res.end();
    }, delay);
  });
};
const server = process.env.TLS_CERT
  ? https.createServer(
    { cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) },
    handler,
  )
  : http.createServer(handler);

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(process.env.PORT || 0), '127.0.0.1', resolve);
});
console.log(`listening on ${server.address().port}`);
