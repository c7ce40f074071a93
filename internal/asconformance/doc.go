// Package asconformance proves keybroker's outputs against an authorization
// server the project did not write: panva's oidc-provider for Node.js
// (internal/oidcprovidertest), driven with the Go SDK against a real
// keybrokerd on SoftHSM2 — DPoP-bound tokens, certificate-bound tokens with
// self_signed_tls_client_auth over TLS 1.3 and 1.2, and private_key_jwt
// client assertions through a key rotation, with the AS reading the keys
// from keybroker's own jwks_uri. It holds tests only; nothing imports it.
package asconformance
