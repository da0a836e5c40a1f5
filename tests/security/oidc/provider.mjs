// A real OpenID Connect provider for the sign-in tests: npm's oidc-provider on a loopback port,
// with its development login form (any user name; the name picks the role, see ROLES).
// Prints {"issuer": "..."} on its first line once it listens.
import http from 'node:http';
import Provider from 'oidc-provider';

const ROLES = { 'dr-rad': 'radiologist', 'auditor-1': 'auditor' };
const redirectUri = process.env.REDIRECT_URI;

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'scanonce',
      token_endpoint_auth_method: 'none',
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
    }],
    pkce: { required: () => true },
    scopes: ['openid', 'scanonce'],
    claims: { openid: ['sub'], scanonce: ['role', 'facility'] },
    conformIdTokenClaims: false, // the role travels in the ID token itself
    findAccount: async (_ctx, id) => ({
      accountId: id,
      claims: async () => ({ sub: id, role: ROLES[id] ?? 'clinician', facility: 'local' }),
    }),
    features: { devInteractions: { enabled: true } },
    cookies: { keys: ['scanonce-test-only'] },
  });
  provider.on('server_error', (_ctx, err) => console.error(err));
  server.on('request', provider.callback());
  console.log(JSON.stringify({ issuer }));
});
