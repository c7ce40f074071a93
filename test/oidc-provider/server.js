// server.js — a real oidc-provider authorization server for keybroker's
// tests (internal/oidcprovidertest starts it; nothing else should).
//
// usage: node server.js CONFIG.json
//
// CONFIG.json:
//   {
//     "host": "127.0.0.1", "port": 0,        // port 0: any free port
//     "cert": "server.crt", "key": "server.key", // the AS's TLS certificate (PEM files)
//     "ca": "ca.crt",                         // PEM bundle trusted when fetching jwks_uri
//     "clients": [ {client metadata}, ... ],  // registered statically
//     "requireDPoPNonce": false,              // answer use_dpop_nonce to proofs without one
//     "refreshStaleJwksClients": ["id", ...]  // see below
//   }
//
// oidc-provider re-fetches a client's jwks_uri only when a client assertion
// fails to verify against its cached copy and that copy is stale (older
// than the larger of 60 s and the response's max-age: lib/helpers/jwt.js
// verify, lib/models/client.js refresh). A key withdrawn from the jwks_uri
// (a revoked version) therefore stays accepted for as long as the cached
// copy holds it and nothing fails. For the clients listed in
// refreshStaleJwksClients this server also re-fetches a stale copy after a
// successful verification and refuses an assertion whose key is no longer
// listed: the assertJwtClientAuthClaimsAndHeader hook a relying party adds
// so that revocation takes effect within the cache lifetime.
//
// The server terminates TLS itself (TLS 1.2 and 1.3) and asks every client
// for a certificate without checking it against any CA (requestCert, not
// rejectUnauthorized): self_signed_tls_client_auth matches the certificate
// against the client's registered JWKS, and certificate-bound tokens carry
// its SHA-256 thumbprint (RFC 8705).
//
// stdout: one line `READY {"issuer":…,"port":…}` once it serves, then one
// answer line per command. stdin: one JSON command per line; the process
// exits when stdin closes, so it never outlives the test that started it.
//   {"cmd":"advance","seconds":N}  move this server's clock N seconds ahead
//                                  (Date.now, which all of oidc-provider's
//                                  expiry and cache decisions read) → CLOCK {...}
//   {"cmd":"events"}               the errors oidc-provider reported since the
//                                  last call, with their error_detail (not
//                                  sent to clients) → EVENTS [...]
//   {"cmd":"fetches"}              how many times each jwks_uri was fetched → FETCHES {...}
// stderr: a log for humans.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as readline from 'node:readline';
import { format } from 'node:util';

import Provider, { errors } from 'oidc-provider';

function die(msg) {
  process.stderr.write(`oidc-provider harness: ${msg}\n`);
  process.exit(2);
}

// stdout is the protocol with the test: oidc-provider's notices go to stderr.
for (const level of ['log', 'info', 'warn', 'debug']) {
  console[level] = (...args) => process.stderr.write(`${format(...args)}\n`);
}

if (process.argv.length !== 3) die('usage: node server.js CONFIG.json');
const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
for (const f of ['cert', 'key', 'ca', 'clients']) {
  if (cfg[f] === undefined) die(`config: "${f}" is missing`);
}

// The clock: real time plus an offset the test moves forward.
let offsetMs = 0;
const realNow = Date.now.bind(Date);
Date.now = () => realNow() + offsetMs;

const events = [];
const fetches = {};

// Outgoing requests (jwks_uri) trust only the test CA.
const agent = new https.Agent({ ca: fs.readFileSync(cfg.ca), keepAlive: false });

// The AS's own signing key (it signs nothing the tests check).
const asKey = {
  ...crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' }),
  kid: 'as-1', alg: 'ES256', use: 'sig',
};

const refreshStale = new Set(cfg.refreshStaleJwksClients || []);

const jwsAlgs = ['ES256', 'ES384', 'RS256', 'PS256'];

const server = https.createServer({
  cert: fs.readFileSync(cfg.cert),
  key: fs.readFileSync(cfg.key),
  minVersion: 'TLSv1.2',
  maxVersion: 'TLSv1.3',
  requestCert: true,
  rejectUnauthorized: false,
});

server.listen(cfg.port || 0, cfg.host || '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `https://${cfg.host || '127.0.0.1'}:${port}`;
  const provider = new Provider(issuer, {
    clients: cfg.clients,
    // The AS signs with ES256 only (asKey); nothing here issues ID Tokens.
    clientDefaults: {
      grant_types: ['client_credentials'],
      response_types: [],
      id_token_signed_response_alg: 'ES256',
    },
    jwks: { keys: [asKey] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    clientAuthMethods: ['client_secret_basic', 'private_key_jwt', 'self_signed_tls_client_auth'],
    enabledJWA: {
      clientAuthSigningAlgValues: jwsAlgs,
      dPoPSigningAlgValues: jwsAlgs,
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      dPoP: {
        enabled: true,
        nonceSecret: crypto.randomBytes(32),
        requireNonce: () => cfg.requireDPoPNonce === true,
      },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        selfSignedTlsClientAuth: true,
        // This process terminates TLS: the certificate is the TLS peer's.
        getCertificate(ctx) {
          const peer = ctx.socket.getPeerCertificate?.(false);
          if (!peer || !peer.raw) return undefined;
          return new crypto.X509Certificate(peer.raw);
        },
      },
    },
    async assertJwtClientAuthClaimsAndHeader(ctx, claims, header, client) {
      if (!refreshStale.has(client.clientId) || !client.jwksUri) return;
      const keystore = client.asymmetricKeyStore;
      if (keystore.fresh()) return;
      await keystore.refresh();
      if (keystore.selectForVerify({ alg: header.alg, kid: header.kid }).length === 0) {
        throw new errors.InvalidClientAuth(`the client assertion's key (kid ${header.kid}) is no longer in the client's jwks_uri`);
      }
    },
    httpOptions(url) {
      fetches[url.href] = (fetches[url.href] || 0) + 1;
      process.stderr.write(`fetch ${url.href}\n`);
      return { agent, signal: AbortSignal.timeout(10000) };
    },
  });

  for (const ev of ['grant.error', 'introspection.error', 'server_error', 'jwks.error']) {
    provider.on(ev, (ctx, err) => {
      const e = {
        event: ev,
        error: err.error || err.name,
        error_description: err.error_description || err.message,
        error_detail: err.error_detail,
        client_id: ctx?.oidc?.client?.clientId,
      };
      events.push(e);
      process.stderr.write(`${JSON.stringify(e)}\n`);
    });
  }
  provider.on('grant.success', (ctx) => {
    process.stderr.write(`grant.success client ${ctx.oidc.client?.clientId}\n`);
  });

  server.on('request', provider.callback());
  process.stdout.write(`READY ${JSON.stringify({ issuer, port })}\n`);
});

server.on('error', (err) => die(`listen: ${err.message}`));

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  let c;
  try {
    c = JSON.parse(line);
  } catch (err) {
    process.stdout.write(`ERROR ${JSON.stringify({ error: `bad command: ${err.message}` })}\n`);
    return;
  }
  switch (c.cmd) {
    case 'advance':
      if (!Number.isInteger(c.seconds) || c.seconds < 0) {
        process.stdout.write(`ERROR ${JSON.stringify({ error: `advance: seconds must be a non-negative integer, got ${c.seconds}` })}\n`);
        return;
      }
      offsetMs += c.seconds * 1000;
      process.stdout.write(`CLOCK ${JSON.stringify({ offset_seconds: offsetMs / 1000, now: Math.floor(Date.now() / 1000) })}\n`);
      return;
    case 'events':
      process.stdout.write(`EVENTS ${JSON.stringify(events.splice(0))}\n`);
      return;
    case 'fetches':
      process.stdout.write(`FETCHES ${JSON.stringify(fetches)}\n`);
      return;
    default:
      process.stdout.write(`ERROR ${JSON.stringify({ error: `unknown command ${JSON.stringify(c.cmd)}` })}\n`);
  }
});
// stdin closed: the test is over (or its process died).
rl.on('close', () => process.exit(0));
