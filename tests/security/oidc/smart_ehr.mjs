// An EHR for the SMART App Launch tests: npm's oidc-provider as its authorization server, and a
// tiny FHIR server beside it (its SMART configuration and two Patients, read only with an access
// token the authorization server issued). Both on loopback ports. The EHR's launch handles name
// its "current patient" (LAUNCHES); the token response carries that patient as SMART's `patient`
// launch context. An authorization request whose `aud` is not this FHIR server is refused, as
// SMART requires. Prints {"issuer": "...", "fhir": "..."} on its first line once both listen.
import http from 'node:http';
import Provider from 'oidc-provider';

const redirectUri = process.env.REDIRECT_URI;
const LAUNCHES = {
  'launch-known': 'pat-known', 'launch-unknown': 'pat-unknown', 'launch-national': 'pat-national',
};
const PATIENTS = {
  // The broker knows the Children's Hospital MRN (the demo data); the EHR's own id comes first.
  'pat-known': [
    { system: 'urn:oid:2.16.840.1.113883.19.5', value: 'EHR-555' },
    { system: 'urn:scanonce:issuer:CHILDRENS', value: 'K346295' },
  ],
  // Known to the broker only by a national ID (a trusted issuer no facility has).
  'pat-national': [{ system: 'urn:scanonce:issuer:NATIONAL', value: 'NAT-42' }],
  'pat-unknown': [{ system: 'urn:scanonce:issuer:CHILDRENS', value: 'K000000-NOBODY' }],
};

function listen(server) {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));
}

const authServer = http.createServer();
const fhirServer = http.createServer();
const issuer = `http://127.0.0.1:${await listen(authServer)}`;
const fhir = `http://127.0.0.1:${await listen(fhirServer)}/fhir`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'scanonce',
    token_endpoint_auth_method: 'none',
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  pkce: { required: () => true },
  scopes: ['openid', 'launch', 'fhirUser', 'patient/*.read'],
  claims: { openid: ['sub'], fhirUser: ['fhirUser'] },
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, fhirUser: `${fhir}/Practitioner/${id}` }),
  }),
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['scanonce-test-only'] },
});
provider.on('server_error', (_ctx, err) => console.error(err));

// The launch handle of each authorization request, by its nonce (the code carries the nonce).
const launchByNonce = new Map();
provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/auth' && ctx.query.launch !== undefined) {
    if (ctx.query.aud !== fhir || !(ctx.query.launch in LAUNCHES)) {
      ctx.status = 400;
      ctx.body = 'aud must be this EHR\'s FHIR server, and launch one of its launches';
      return;
    }
    launchByNonce.set(ctx.query.nonce, ctx.query.launch);
  }
  await next();
  const code = ctx.oidc?.entities?.AuthorizationCode;
  if (ctx.path === '/token' && ctx.status === 200 && code && launchByNonce.has(code.nonce)) {
    ctx.body = { ...ctx.body, patient: LAUNCHES[launchByNonce.get(code.nonce)] };
  }
});
authServer.on('request', provider.callback());

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/fhir+json' });
  res.end(JSON.stringify(body));
}

fhirServer.on('request', async (req, res) => {
  const path = new URL(req.url, fhir).pathname;
  if (path === '/fhir/.well-known/smart-configuration') {
    return send(res, 200, {
      issuer,
      authorization_endpoint: `${issuer}/auth`,
      token_endpoint: `${issuer}/token`,
      scopes_supported: ['openid', 'launch', 'fhirUser', 'patient/*.read'],
      capabilities: ['launch-ehr', 'context-ehr-patient', 'client-public', 'sso-openid-connect'],
      code_challenge_methods_supported: ['S256'],
    });
  }
  const match = /^\/fhir\/Patient\/([A-Za-z0-9.-]+)$/.exec(path);
  if (!match) return send(res, 404, { resourceType: 'OperationOutcome' });
  const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
  const token = bearer ? await provider.AccessToken.find(bearer[1]) : undefined;
  if (!token || !token.scope.split(' ').includes('patient/*.read')) {
    return send(res, 401, { resourceType: 'OperationOutcome', issue: [{ code: 'login' }] });
  }
  const identifier = PATIENTS[match[1]];
  if (!identifier) return send(res, 404, { resourceType: 'OperationOutcome' });
  return send(res, 200, { resourceType: 'Patient', id: match[1], identifier });
});

console.log(JSON.stringify({ issuer, fhir }));
