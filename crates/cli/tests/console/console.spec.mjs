// End-to-end test of keyplane's web console in Debian's Chromium, driven by playwright-core.
// Started by crates/cli/tests/console_e2e.rs, which runs `keyplane serve` on 127.0.0.1 and passes:
//   KP_URL          the server's base URL
//   KP_ORG          the organization id
//   KP_ROOT         a token with scope `*`
//   KP_READER       a token with only `api_tokens:read`
//   KP_HOOK_URL     a webhook receiver on loopback that answers 204
//   KP_SHOTS        where to save screenshots (optional)
//   KP_OIDC_USER    when set, the login name to use at the OIDC provider's login page
// Exits non-zero with a message on the first failed check.
import { chromium } from 'playwright-core';
import * as fs from 'node:fs';
import * as path from 'node:path';

const URL = process.env.KP_URL;
const ORG = process.env.KP_ORG;
const ROOT = process.env.KP_ROOT;
const READER = process.env.KP_READER;
const SHOTS = process.env.KP_SHOTS;
const OIDC_USER = process.env.KP_OIDC_USER;
const HOOK_URL = process.env.KP_HOOK_URL;
for (const [name, value] of Object.entries({ KP_URL: URL, KP_ORG: ORG, KP_ROOT: ROOT, KP_READER: READER, KP_HOOK_URL: HOOK_URL })) {
  if (!value) throw new Error(`${name} is required`);
}
const API = `${URL}/api/v1/organizations/${ORG}`;
const WIDTHS = { narrow: { width: 375, height: 812 }, wide: { width: 1440, height: 900 } };
const STEP_TIMEOUT = 15_000;

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function log(message) {
  console.log(`- ${message}`);
}

async function api(method, url, token, body) {
  const response = await fetch(url, {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      ...(body ? { 'content-type': 'application/json' } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: response.status, body: await response.text() };
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  // Playwright gives each launch a fresh, empty profile directory.
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  timeout: 60_000,
});

/// A fresh browser context (its own cookies); CSP violations and page errors fail the test.
async function newPage(viewport = WIDTHS.wide, options = {}) {
  const context = await browser.newContext({ viewport, ...options });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('console', (message) => {
    const text = message.text();
    if (/Content.Security.Policy|Refused to/i.test(text)) {
      console.error(`browser: ${text}`);
      process.exitCode = 1;
    }
  });
  page.on('pageerror', (error) => {
    console.error(`page error: ${error}`);
    process.exitCode = 1;
  });
  return { context, page };
}

/// Saves the current page at both widths (as `<name>-375.png` and `<name>-1440.png`).
async function shoot(page, name, options = {}) {
  if (!SHOTS) return;
  fs.mkdirSync(SHOTS, { recursive: true });
  const original = page.viewportSize();
  for (const [, size] of Object.entries(WIDTHS)) {
    await page.setViewportSize(size);
    await page.screenshot({
      path: path.join(SHOTS, `${name}-${size.width}.png`),
      fullPage: true,
      ...options,
    });
  }
  await page.setViewportSize(original);
}

async function signIn(page, token) {
  await page.goto(`${URL}/console`);
  check(page.url().endsWith('/console/login'), `not signed in, /console sends to the sign-in page (at ${page.url()})`);
  await page.getByLabel('API token or service-account token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Overview', level: 1 }).waitFor();
}

/// Reloads `page` until `await ready()` holds, at most 40 times half a second apart.
async function reloadUntil(page, ready, what) {
  for (let i = 0; i < 40; i++) {
    if (await ready()) return;
    await page.waitForTimeout(500);
    await page.reload();
  }
  throw new Error(`check failed: ${what} (not within 20 s)`);
}

async function csrfOf(page) {
  return page.locator('input[name="csrf"]').first().inputValue();
}

/// A POST from the page's own origin, as a forged form or script would send it.
async function postFromPage(page, action, fields) {
  return page.evaluate(async ({ action, fields }) => {
    const response = await fetch(action, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(fields).toString(),
      redirect: 'manual',
    });
    return { status: response.status, text: await response.text() };
  }, { action, fields });
}

try {
  // --- Sign in with a token ----------------------------------------------------------------
  const { context, page } = await newPage(WIDTHS.wide, { permissions: ['clipboard-read', 'clipboard-write'] });
  await page.goto(`${URL}/console`);
  await page.getByRole('heading', { name: 'Sign in to keyplane' }).waitFor();
  const headers = (await page.request.get(`${URL}/console/login`)).headers();
  check(headers['content-security-policy']?.includes("script-src 'self'"), 'strict CSP on the console');
  check(headers['content-security-policy']?.includes("frame-ancestors 'none'"), "CSP frame-ancestors 'none'");
  check(!headers['content-security-policy']?.includes('unsafe'), 'no unsafe-* in the CSP');
  await shoot(page, 'sign-in');

  await signIn(page, ROOT);
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === 'keyplane_session');
  check(session, `a session cookie (${cookies.map((c) => c.name)})`);
  check(session.httpOnly && session.sameSite === 'Strict', 'the session cookie is HttpOnly and SameSite=Strict');
  check(!cookies.some((c) => c.value.includes(ROOT)), 'the token is in no cookie');
  const storage = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
  check(!storage.includes(ROOT) && storage === '{}{}', 'nothing in localStorage or sessionStorage');
  check(!page.url().includes(ROOT), 'the token is not in the URL');
  const overviewText = await page.textContent('main');
  check(overviewText.includes('Live credentials'), 'the overview shows counts');
  log('signed in with a token; the browser holds only an HttpOnly, SameSite=Strict session cookie');

  // --- Create a token and read its secret once ----------------------------------------------
  await page.getByRole('navigation', { name: 'Console' }).getByRole('link', { name: 'API tokens' }).click();
  await page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
  await page.getByLabel('Name', { exact: true }).fill('e2e-deploy');
  await page.getByRole('checkbox', { name: 'api_tokens:read' }).check();
  await page.getByLabel('Other scopes').fill('deploy:run');
  await page.getByLabel('Expires').selectOption('30');
  await page.getByRole('button', { name: 'Create token' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  const secret = await page.locator('#secret').inputValue();
  check(/^aether_[A-Za-z0-9]+/.test(secret), `the page shows the new secret (${secret.slice(0, 7)}…)`);
  const again = await page.request.get(page.url());
  check(!(await again.text()).includes(secret), 'a second fetch of the page does not show it');
  await page.getByRole('button', { name: 'Copy' }).click();
  await page.getByText('Copied.').waitFor();
  check(await page.evaluate(() => navigator.clipboard.readText()) === secret, 'the copy button copies the secret');
  const used = await api('GET', `${API}/api-tokens`, secret);
  check(used.status === 200, `the shown secret works on the API (${used.status})`);
  await page.goto(`${URL}/console/api-tokens`);
  await page.goBack();
  check(!(await page.content()).includes(secret), 'going back does not show the secret again');
  log('created a token; its secret is copied by the button, works, and is shown once');

  // A second token, to show the secret page (its secret masked in the screenshot).
  await page.goto(`${URL}/console/api-tokens`);
  await page.getByLabel('Name', { exact: true }).fill('e2e-screenshot');
  await page.getByRole('checkbox', { name: 'audit:read' }).check();
  await page.getByRole('button', { name: 'Create token' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  const done = page.getByRole('button', { name: 'Done' });
  check(await done.isDisabled(), '"Done" waits for "I have stored it"');
  await shoot(page, 'secret-once', { mask: [page.locator('#secret')], maskColor: '#9aa7b4' });
  await page.reload();
  await page.getByRole('heading', { name: 'Secret no longer shown' }).waitFor();
  check(!(await page.content()).includes('aether_'), 'after a reload the secret is gone');
  log('reloading the secret page shows that it is gone');

  await page.goto(`${URL}/console/api-tokens?q=e2e`);
  await shoot(page, 'api-tokens');

  // --- Rotate with a grace period ------------------------------------------------------------
  await page.getByRole('link', { name: 'Rotate e2e-deploy' }).click();
  await page.getByRole('radio', { name: 'for 1 hour' }).check();
  await shoot(page, 'rotate');
  await page.getByRole('button', { name: 'Rotate' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  const rotated = await page.locator('#secret').inputValue();
  check(rotated !== secret && rotated.startsWith('aether_'), 'rotation shows a new secret');
  check((await page.textContent('main')).includes('previous secret keeps working until'), 'the grace period is stated');
  check((await api('GET', `${API}/api-tokens`, secret)).status === 200, 'the old secret works during the grace period');
  check((await api('GET', `${API}/api-tokens`, rotated)).status === 200, 'the new secret works');
  await page.getByLabel('I have stored it').check();
  await page.getByRole('button', { name: 'Done' }).click();
  await page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
  check((await page.textContent('main')).includes('previous secret accepted until'), 'the list shows the grace period');
  log('rotated with a 1 hour grace period: both secrets work');

  // --- Revoke with confirmation ---------------------------------------------------------------
  await page.getByRole('link', { name: 'Revoke e2e-deploy' }).click();
  await page.getByRole('heading', { name: 'Revoke e2e-deploy' }).waitFor();
  await shoot(page, 'revoke');
  await page.getByRole('button', { name: 'Revoke API token e2e-deploy for good' }).click();
  await page.getByRole('status').filter({ hasText: 'Revoked API token' }).waitFor();
  check((await api('GET', `${API}/api-tokens`, rotated)).status === 401, 'the revoked token is refused');
  check((await api('GET', `${API}/api-tokens`, secret)).status === 401, 'its previous secret too');
  check(!(await page.textContent('tbody')).includes('e2e-deploy'), 'the list no longer shows it');
  log('revoked after a confirmation page; both secrets are refused');

  // --- CSRF ------------------------------------------------------------------------------------
  const without = await postFromPage(page, '/console/api-tokens', { name: 'no-csrf', scopes: 'api_tokens:read' });
  check(without.status === 403 && without.text.includes('CSRF'), `a POST without the CSRF token is refused (${without.status})`);
  const wrong = await postFromPage(page, '/console/api-tokens', { csrf: 'x'.repeat(43), name: 'bad-csrf', scopes: 'api_tokens:read' });
  check(wrong.status === 403, `a POST with a wrong CSRF token is refused (${wrong.status})`);
  const names = JSON.parse((await api('GET', `${API}/api-tokens`, ROOT)).body).items.map((t) => t.name);
  check(!names.includes('no-csrf') && !names.includes('bad-csrf'), `nothing was created (${names})`);
  const loginWithout = await page.request.post(`${URL}/console/login`, { form: { token: ROOT }, maxRedirects: 0 });
  check(loginWithout.status() === 403, `the sign-in form needs its CSRF token too (${loginWithout.status()})`);
  log('POSTs without or with a wrong CSRF token are refused');

  // --- The other pages --------------------------------------------------------------------------
  await page.goto(`${URL}/console/service-accounts`);
  await page.getByLabel('Name', { exact: true }).fill('e2e-worker');
  await page.getByRole('button', { name: 'Create service account' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  check((await page.locator('#secret').inputValue()).length > 20, 'a service account secret is shown');
  await page.goto(`${URL}/console/service-accounts`);
  check((await page.textContent('tbody')).includes('e2e-worker'), 'the service account is listed');
  await page.getByLabel('Grant a right to e2e-worker').selectOption('registry:read');
  await page.getByRole('button', { name: 'Grant to e2e-worker' }).click();
  await page.getByRole('status').filter({ hasText: 'Granted to “e2e-worker”' }).waitFor();
  await page.getByLabel('Grant a right to e2e-worker').selectOption('audit:read');
  await page.getByRole('button', { name: 'Grant to e2e-worker' }).click();
  await page.getByRole('button', { name: 'Revoke grant registry:read of e2e-worker' }).click();
  await page.getByRole('status').filter({ hasText: 'Revoked the grant' }).waitFor();
  const grants = await page.locator('td[data-label="Grants"] code').allTextContents();
  check(grants.join() === 'audit:read', `grants are given and revoked (${grants})`);
  await shoot(page, 'service-accounts');
  await page.getByRole('link', { name: 'e2e-worker', exact: true }).click();
  await page.getByRole('heading', { name: 'Service account e2e-worker', level: 1 }).waitFor();
  const facts = await page.textContent('dl.facts');
  check(/Created by\s*API token \S+ via console/.test(facts), `the account's page says who created it (${facts})`);
  check(/audit:read\s*created by API token \S+ via console/.test(facts), `and who gave each grant (${facts})`);
  await shoot(page, 'credential');

  await page.goto(`${URL}/console/registry`);
  await page.getByRole('button', { name: 'Enable the registry' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  check((await page.textContent('main')).includes('docker login'), 'the default robot comes with a docker login line');
  await page.goto(`${URL}/console/registry`);
  await page.locator('#name').fill('ci-pusher');
  await page.getByRole('textbox', { name: /^Permissions/ }).fill('pull\npush:team/*');
  await page.getByRole('button', { name: 'Create robot' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  const robotText = await page.textContent('main');
  check(robotText.includes('skopeo login') && robotText.includes('+ci-pusher'), 'the robot secret page has docker and skopeo lines');
  await page.goto(`${URL}/console/registry`);
  await page.getByRole('link', { name: 'Permissions of ci-pusher' }).click();
  await page.getByRole('textbox', { name: /^Permissions/ }).fill('pull:team/*');
  await page.getByRole('button', { name: 'Save permissions' }).click();
  await page.getByRole('status').filter({ hasText: 'Saved the permissions' }).waitFor();
  await shoot(page, 'registry');

  await page.goto(`${URL}/console/audit`);
  const auditText = await page.textContent('main');
  check(auditText.includes('api_token.revoked') && auditText.includes('api_token.created'), 'the audit log shows the changes');
  await page.getByLabel('Action').fill('api_token.');
  await page.getByRole('button', { name: 'Filter' }).click();
  check(!(await page.textContent('tbody')).includes('robot_account.created'), 'the action filter applies');
  const hover = await page.locator('tbody time').first().getAttribute('title');
  check(/Z$/.test(hover), `dates keep their UTC value on hover (${hover})`);
  await shoot(page, 'audit');
  await page.goto(`${URL}/console`);
  check((await page.textContent('main')).includes('Recent activity'), 'the overview shows recent activity');
  await shoot(page, 'overview');
  log('service accounts and their grants, registry and robots, audit log and overview work');

  // --- Webhooks and their deliveries -----------------------------------------------------------
  await page.getByRole('navigation', { name: 'Console' }).getByRole('link', { name: 'Webhooks' }).click();
  await page.getByRole('heading', { name: 'Webhooks', level: 1 }).waitFor();
  const badHook = await postFromPage(page, '/console/webhooks', {
    csrf: await csrfOf(page), url: 'ftp://example.com/', events: 'Not An Action', description: '',
  });
  check(badHook.status === 422 && badHook.text.includes('URL: ') && badHook.text.includes('Events: #1: '),
    `a bad URL and event pattern are refused field by field (${badHook.status})`);
  await page.getByLabel('URL', { exact: true }).fill(HOOK_URL);
  await page.getByLabel('Events', { exact: true }).fill('api_token.*');
  await page.getByLabel(/^Description/).fill('e2e-hook');
  check(await page.getByRole('checkbox', { name: 'Enabled' }).isChecked(), 'a new webhook is enabled by default');
  await page.getByRole('button', { name: 'Create webhook' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  const hookSecret = await page.locator('#secret').inputValue();
  check(/^whsec_[A-Za-z0-9+/=]{40,}$/.test(hookSecret), `the webhook's signing secret is shown (${hookSecret.slice(0, 6)}…)`);
  check((await page.textContent('main')).includes('webhook e2e-hook'), 'the secret page names the webhook');
  check(await page.getByRole('button', { name: 'Done' }).isDisabled(), '"Done" waits for "I have stored it"');
  await page.reload();
  await page.getByRole('heading', { name: 'Secret no longer shown' }).waitFor();
  check(!(await page.content()).includes(hookSecret), 'after a reload the signing secret is gone');
  await page.goto(`${URL}/console/webhooks`);
  const hookRow = page.locator('tbody tr').filter({ hasText: 'e2e-hook' });
  check((await hookRow.textContent()).includes(HOOK_URL), 'the list shows the webhook and its URL');
  check(!(await page.content()).includes(hookSecret), 'the list does not show the secret');
  const hooks = JSON.parse((await api('GET', `${API}/webhooks`, ROOT)).body).items;
  check(hooks.length === 1 && hooks[0].events.join() === 'api_token.*' && hooks[0].enabled, `the API sees the webhook (${JSON.stringify(hooks)})`);
  const hookId = hooks[0].id;
  log('created a webhook; its signing secret is shown once');

  await page.getByRole('link', { name: 'Edit e2e-hook' }).click();
  await page.getByRole('heading', { name: 'Edit e2e-hook' }).waitFor();
  check(await page.getByLabel('URL', { exact: true }).inputValue() === HOOK_URL, 'the edit form holds the URL');
  await page.getByLabel('Events', { exact: true }).fill('api_token.* robot_account.created');
  await shoot(page, 'webhook-edit');
  await page.getByRole('button', { name: 'Save webhook' }).click();
  await page.getByRole('status').filter({ hasText: 'Saved the webhook “e2e-hook”' }).waitFor();
  const edited = JSON.parse((await api('GET', `${API}/webhooks/${hookId}`, ROOT)).body);
  check(edited.events.join() === 'api_token.*,robot_account.created', `the edit is saved (${edited.events})`);
  await shoot(page, 'webhooks');
  log('edited the webhook');

  const hookToken = await api('POST', `${API}/api-tokens`, ROOT, { name: 'e2e-hook-trigger', scopes: ['api_tokens:read'] });
  check(hookToken.status === 201, `a token is created to trigger a delivery (${hookToken.status})`);
  await page.getByRole('link', { name: 'Deliveries of e2e-hook' }).click();
  await page.getByRole('heading', { name: 'Deliveries of e2e-hook' }).waitFor();
  const attempts = async () => (await page.locator('tbody td[data-label="Attempts"]').first().textContent()).trim();
  const deliveryStatus = async () => (await page.locator('tbody td[data-label="Status"]').first().textContent()).trim();
  await reloadUntil(page, async () => await page.locator('tbody td[data-label="Status"]').count() > 0 && await deliveryStatus() === 'succeeded',
    'the api_token.created delivery succeeds');
  const row = await page.locator('tbody tr').first().textContent();
  check(row.includes('api_token.created') && row.includes('204') && row.includes(' ms'), `the delivery shows its event, code and latency (${row})`);
  check(await attempts() === '1', 'one attempt so far');
  await page.getByLabel('Status').selectOption('failed');
  await page.getByRole('button', { name: 'Filter' }).click();
  check((await page.textContent('tbody')).includes('No deliveries.'), 'the status filter applies');
  await page.goto(`${URL}/console/webhooks/${hookId}/deliveries`);
  await page.getByRole('button', { name: /^Retry the delivery of api_token.created/ }).click();
  await page.getByRole('status').filter({ hasText: 'Queued the delivery of api_token.created' }).waitFor();
  await reloadUntil(page, async () => await deliveryStatus() === 'succeeded' && await attempts() === '2',
    'the retry makes a second attempt, which succeeds');
  await shoot(page, 'webhook-deliveries');
  const forgedRetry = await postFromPage(page, `/console/webhooks/${hookId}/deliveries/${hookId}/retry`, { csrf: 'x'.repeat(43) });
  check(forgedRetry.status === 403, `a retry without the session's CSRF token is refused (${forgedRetry.status})`);
  const deliveryId = (await page.locator('tbody td[data-label="Event"] code').nth(1).textContent()).trim();
  await page.goto(`${URL}/console/webhooks/${hookId}`);
  await page.getByRole('checkbox', { name: 'Enabled' }).uncheck();
  await page.getByRole('button', { name: 'Save webhook' }).click();
  await page.getByRole('status').filter({ hasText: 'Saved the webhook' }).waitFor();
  check((await page.locator('tbody td[data-label="Enabled"]').first().textContent()).trim() === 'no', 'the list shows it disabled');
  await page.goto(`${URL}/console/webhooks/${hookId}/deliveries`);
  check(await page.getByRole('button', { name: /^Retry/ }).count() === 0, 'no retry button while the webhook is disabled');
  const disabledRetry = await postFromPage(page, `/console/webhooks/${hookId}/deliveries/${deliveryId}/retry`, { csrf: await csrfOf(page) });
  check(disabledRetry.status === 409 && disabledRetry.text.includes('disabled'), `a retry of a disabled webhook's delivery is refused (${disabledRetry.status})`);
  await page.goto(`${URL}/console/webhooks/${hookId}`);
  await page.getByRole('checkbox', { name: 'Enabled' }).check();
  await page.getByRole('button', { name: 'Save webhook' }).click();
  await page.getByRole('status').filter({ hasText: 'Saved the webhook' }).waitFor();
  check(JSON.parse((await api('GET', `${API}/webhooks/${hookId}`, ROOT)).body).enabled, 'enabled again');
  log('the delivery is shown with its response code and latency, and retried; not while the webhook is disabled');

  await page.goto(`${URL}/console/webhooks`);
  await page.getByRole('link', { name: 'Rotate the secret of e2e-hook' }).click();
  await page.getByRole('button', { name: 'Rotate the secret' }).click();
  await page.getByRole('heading', { name: 'Store this secret now' }).waitFor();
  const rotatedHook = await page.locator('#secret').inputValue();
  check(rotatedHook.startsWith('whsec_') && rotatedHook !== hookSecret, 'rotation shows a new signing secret');
  check((await page.textContent('main')).includes('previous secret too until'), 'the overlap is stated');
  await page.getByLabel('I have stored it').check();
  await page.getByRole('button', { name: 'Done' }).click();
  await page.getByRole('heading', { name: 'Webhooks', level: 1 }).waitFor();
  await page.goBack();
  check(!(await page.content()).includes(rotatedHook), 'going back does not show the rotated secret again');
  const afterRotation = JSON.parse((await api('GET', `${API}/webhooks/${hookId}`, ROOT)).body);
  check(afterRotation.previous_secret_expires_at, 'the API shows the previous secret\'s overlap');
  log('rotated the signing secret; shown once');

  await page.goto(`${URL}/console/webhooks`);
  await page.getByRole('link', { name: 'Delete e2e-hook' }).click();
  await page.getByRole('heading', { name: 'Delete e2e-hook' }).waitFor();
  await shoot(page, 'webhook-delete');
  await page.getByRole('button', { name: 'Delete the webhook e2e-hook for good' }).click();
  await page.getByRole('status').filter({ hasText: 'Deleted the webhook “e2e-hook”' }).waitFor();
  check((await page.textContent('tbody')).includes('No webhooks yet.'), 'the list is empty');
  check(JSON.parse((await api('GET', `${API}/webhooks`, ROOT)).body).items.length === 0, 'the API sees no webhook');
  log('deleted the webhook after a confirmation page');

  // --- A read-only token, in another time zone ------------------------------------------------
  const reader = await newPage(WIDTHS.wide, { timezoneId: 'Asia/Tokyo' });
  await signIn(reader.page, READER);
  await reader.page.goto(`${URL}/console/api-tokens`);
  await reader.page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
  check(await reader.page.getByRole('button', { name: 'Create token' }).count() === 0, 'no create button for a read-only token');
  check(await reader.page.getByRole('link', { name: /^Rotate / }).count() === 0, 'no rotate links for a read-only token');
  check(await reader.page.getByRole('navigation', { name: 'Console' }).getByRole('link', { name: 'Audit log' }).count() === 0, 'no audit log for a token without audit:read');
  const forged = await postFromPage(reader.page, '/console/api-tokens', {
    csrf: await csrfOf(reader.page), name: 'forged', scopes: 'api_tokens:read', expires_in_days: '30',
  });
  check(forged.status === 403 && forged.text.includes('You may not do this'), `a forged create with a valid CSRF token is refused by the use case (${forged.status})`);
  const audit = await reader.page.goto(`${URL}/console/audit`);
  check(audit.status() === 403, `the audit page is refused (${audit.status()})`);
  check(await reader.page.getByRole('link', { name: 'Webhooks' }).count() === 0, 'no Webhooks page for a token without webhooks:manage');
  const readerHooks = await reader.page.goto(`${URL}/console/webhooks`);
  check(readerHooks.status() === 403, `the webhooks page is refused (${readerHooks.status()})`);
  await reader.page.goto(`${URL}/console/api-tokens`);
  const forgedHook = await postFromPage(reader.page, '/console/webhooks', {
    csrf: await csrfOf(reader.page), url: HOOK_URL, events: '*', description: 'forged', enabled: 'true',
  });
  check(forgedHook.status === 403 && forgedHook.text.includes('You may not do this'), `a forged webhook create is refused (${forgedHook.status})`);
  check(JSON.parse((await api('GET', `${API}/webhooks`, ROOT)).body).items.length === 0, 'no webhook was created');
  await reader.page.goto(`${URL}/console/api-tokens`);
  const shown = reader.page.locator('tbody time').first();
  const utc = await shown.getAttribute('title');
  const local = await shown.textContent();
  check(/GMT\+9|JST/.test(local) && utc.endsWith('Z'), `dates in the browser's time zone (${local}), UTC on hover (${utc})`);
  await shoot(reader.page, 'read-only');
  log('a read-only token sees no create button and no Webhooks page; its forged POSTs are refused; dates in its time zone');

  // --- Revoking the signed-in token ends its session ---------------------------------------------
  const victimToken = JSON.parse((await api('POST', `${API}/api-tokens`, ROOT, { name: 'e2e-session', scopes: ['api_tokens:read'] })).body);
  const victim = await newPage();
  await signIn(victim.page, victimToken.token);
  check((await api('DELETE', `${API}/api-tokens/${victimToken.id}`, ROOT)).status === 204, 'revoked through the API');
  await victim.page.goto(`${URL}/console/api-tokens`);
  check(new globalThis.URL(victim.page.url()).pathname === '/console/login', `the session of a revoked token ends at once (${victim.page.url()})`);
  log('revoking the signed-in token ends its console session');

  // --- OIDC sign-in through the provider's login page --------------------------------------------
  if (OIDC_USER) {
    const user = await newPage();
    // Sent to sign in from a console page, the sign-in through the provider goes back to it, as
    // the token sign-in does.
    await user.page.goto(`${URL}/console/api-tokens?q=e2e`);
    check(new globalThis.URL(user.page.url()).pathname === '/console/login', `not signed in, sent to the sign-in page (${user.page.url()})`);
    await user.page.getByRole('link', { name: /^Sign in with / }).click();
    await user.page.locator('input[name="login"]').fill(OIDC_USER);
    await user.page.locator('input[name="password"]').fill('any');
    await user.page.locator('button[type="submit"]').click();
    // The provider's development consent page.
    await user.page.locator('button[type="submit"]').click();
    await user.page.waitForURL((url) => url.pathname !== '/console/oidc/callback' && url.origin === URL);
    const landed = new globalThis.URL(user.page.url());
    check(landed.pathname === '/console/api-tokens' && landed.search === '?q=e2e', `the OIDC sign-in goes back to the page it was needed on (${user.page.url()})`);
    await user.page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
    check((await user.page.textContent('header')).includes(OIDC_USER), 'signed in as the provider user');
    const userCookies = await user.context.cookies();
    check(userCookies.some((c) => c.name === 'keyplane_session' && c.httpOnly), 'an OIDC sign-in gets a session cookie too');
    check(!userCookies.some((c) => c.value.split('.').length === 3), 'no JWT in any cookie');
    await user.page.getByRole('navigation', { name: 'Console' }).getByRole('link', { name: 'API tokens' }).click();
    await user.page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
    // The user owns `default` and may only read tokens in `second`; it starts in either.
    const mayCreate = async () => (await user.page.getByRole('button', { name: 'Create token' }).count()) === 1;
    const first = await user.page.textContent('header .tenant');
    check(await mayCreate() === (first === 'default'), `rights as granted in ${first}`);
    const other = first === 'default' ? 'second' : 'default';
    await user.page.getByLabel('Organization', { exact: true }).selectOption({ label: other });
    await user.page.getByRole('button', { name: 'Switch' }).click();
    await user.page.getByRole('heading', { name: 'Overview', level: 1 }).waitFor();
    check((await user.page.textContent('header .tenant')) === other, `switched to ${other}`);
    await user.page.goto(`${URL}/console/api-tokens`);
    check(await mayCreate() === (other === 'default'), `rights as granted in ${other}`);
    log(`signed in with the OIDC provider as ${OIDC_USER}, and switched organizations`);
  }

  // --- Sign-out ends the session on the server -----------------------------------------------------
  const before = (await context.cookies()).find((c) => c.name === 'keyplane_session');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByText('You have signed out.').waitFor();
  const replay = await browser.newContext();
  await replay.addCookies([{ ...before }]);
  const replayPage = await replay.newPage();
  await replayPage.goto(`${URL}/console/api-tokens`);
  check(new globalThis.URL(replayPage.url()).pathname === '/console/login', `the old session cookie no longer works (${replayPage.url()})`);
  log('signed out; the old cookie is dead on the server');
} catch (error) {
  console.error(error.stack || String(error));
  process.exitCode = 1;
} finally {
  await browser.close();
}
