// The console as a keyboard-only or screen-reader user meets it, in Debian's Chromium driven by
// playwright-core. Started by crates/cli/tests/console_e2e.rs (`console_accessibility`), which runs
// `keyplane serve` on 127.0.0.1 and passes:
//   KP_URL   the server's base URL
//   KP_ROOT  a token with scope `*`
// Every step after the first page is taken with the keyboard (Tab, Space, Enter, typing): a step a
// keyboard cannot take fails. Each page is checked for its landmarks, one <h1>, heading order,
// a unique <title>, captions and header cells of its tables, a visible focus, and with axe-core
// (WCAG 2.0-2.2 A and AA rules, and its landmark and heading rules).
// Exits non-zero with a message on the first failed check.
import { chromium } from 'playwright-core';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';

const URL = process.env.KP_URL;
const ROOT = process.env.KP_ROOT;
for (const [name, value] of Object.entries({ KP_URL: URL, KP_ROOT: ROOT })) {
  if (!value) throw new Error(`${name} is required`);
}
const AXE = fs.readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
/// More than any page's tab stops before the control a step wants.
const MAX_TABS = 120;

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function log(message) {
  console.log(`- ${message}`);
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  timeout: 60_000,
});

/// Whether `locator`'s element has the keyboard focus.
async function focused(locator) {
  return locator.evaluate((el) => el === document.activeElement).catch(() => false);
}

/// Presses Tab (or `key`) until `locator` has the focus: a control no number of Tabs reaches fails.
async function tabTo(page, locator, what, key = 'Tab') {
  await locator.first().waitFor({ state: 'attached' });
  for (let i = 0; i < MAX_TABS; i++) {
    if (await focused(locator)) return;
    await page.keyboard.press(key);
  }
  throw new Error(`check failed: ${what} is not reached with ${key}`);
}

/// The text of the elements `aria-describedby` names, as a screen reader reads them after the name.
async function description(locator) {
  return locator.evaluate((el) => (el.getAttribute('aria-describedby') || '')
    .split(/\s+/).filter(Boolean)
    .map((id) => document.getElementById(id)?.textContent ?? '')
    .join(' '));
}

const titles = new Map();

/// The structure every console page must have, axe-core's WCAG rules, and a title of its own.
async function checkPage(page, what) {
  const facts = await page.evaluate(() => {
    const headings = [...document.querySelectorAll('h1, h2, h3, h4, h5, h6')].map((h) => Number(h.tagName[1]));
    const tables = [...document.querySelectorAll('table')].map((t) => ({
      caption: t.caption?.textContent.trim() ?? '',
      headers: [...t.querySelectorAll('thead th')].every((th) => th.getAttribute('scope') === 'col'),
    }));
    // A rule that hides the focus ring must be one that applies only when it is not needed.
    const hidden = [];
    for (const sheet of document.styleSheets) {
      for (const rule of sheet.cssRules) {
        if (rule.style && /focus/.test(rule.selectorText) && rule.style.outlineStyle === 'none'
          && !/:not\(:focus-visible\)/.test(rule.selectorText)) {
          hidden.push(rule.selectorText);
        }
      }
    }
    const first = document.querySelector('a[href], button, input, select, textarea');
    return {
      lang: document.documentElement.lang,
      title: document.title,
      h1: headings.filter((h) => h === 1).length,
      skipped: headings.some((h, i) => i > 0 && h > headings[i - 1] + 1) || headings[0] !== 1,
      tables,
      hidden,
      banner: document.querySelectorAll('body > header').length,
      main: document.querySelectorAll('main').length,
      skip: first?.getAttribute('href') === '#main',
    };
  });
  check(facts.lang === 'en', `${what}: <html lang="en"> (${facts.lang})`);
  check(facts.h1 === 1, `${what}: one <h1> (${facts.h1})`);
  check(!facts.skipped, `${what}: headings start at <h1> and skip no level`);
  check(facts.banner === 1 && facts.main === 1, `${what}: a header and a main landmark`);
  check(facts.skip, `${what}: the first link skips to the main content`);
  for (const table of facts.tables) {
    check(table.caption.length > 0, `${what}: every table has a caption`);
    check(table.headers, `${what}: every column header is <th scope="col">`);
  }
  check(facts.hidden.length === 0, `${what}: no focus style hides the outline (${facts.hidden})`);
  const seen = titles.get(facts.title);
  check(!seen || seen === what, `${what}: a title of its own ("${facts.title}" is also ${seen}'s)`);
  titles.set(facts.title, what);

  await page.evaluate(AXE);
  const violations = await page.evaluate(async () => {
    const found = [];
    for (const runOnly of [
      { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa'] },
      { type: 'rule', values: ['heading-order', 'landmark-one-main', 'page-has-heading-one', 'region', 'skip-link', 'landmark-unique', 'empty-table-header'] },
    ]) {
      const result = await window.axe.run(document, { runOnly });
      found.push(...result.violations.map((v) => `${v.id} (${v.help}): ${v.nodes.map((n) => n.target.join(' ')).join(', ')}`));
    }
    return found;
  });
  check(violations.length === 0, `${what}: axe-core finds no WCAG violation:\n  ${violations.join('\n  ')}`);
}

/// Checks the focused element shows where the focus is: an outline or a ring.
async function focusShows(page, what) {
  const style = await page.evaluate(() => {
    const s = getComputedStyle(document.activeElement);
    return { outline: s.outlineStyle, width: parseFloat(s.outlineWidth), shadow: s.boxShadow };
  });
  check((style.outline !== 'none' && style.width >= 2) || style.shadow !== 'none',
    `${what}: the focus is visible (${JSON.stringify(style)})`);
}

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('pageerror', (error) => {
    console.error(`page error: ${error}`);
    process.exitCode = 1;
  });

  // --- Sign in by keyboard; a refused token is tied to its field --------------------------------
  await page.goto(`${URL}/console/login`);
  await checkPage(page, 'the sign-in page');
  const tokenField = page.getByLabel('API token or service-account token');
  check(await focused(tokenField), 'the sign-in page puts the focus in the token field');
  await page.keyboard.type('aether_not_a_token');
  await page.keyboard.press('Enter');
  await page.getByRole('alert').waitFor();
  check(await tokenField.getAttribute('aria-invalid') === 'true', 'a refused token marks its field invalid');
  check((await description(tokenField)).includes('was not accepted'), 'the refusal is the token field\'s description');
  check((await page.title()).startsWith('Error: '), `the title says there is an error (${await page.title()})`);
  check(await focused(tokenField), 'the focus is back in the token field');
  await page.keyboard.type(ROOT);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Overview', level: 1 }).waitFor();
  log('signed in with the keyboard alone; a refused token is announced and tied to its field');

  // --- The skip link, the focus ring ---------------------------------------------------------------
  await checkPage(page, 'the overview');
  await page.keyboard.press('Tab');
  const skip = page.getByRole('link', { name: 'Skip to content' });
  check(await focused(skip), 'the first Tab reaches "Skip to content"');
  check(await skip.isVisible(), 'the skip link shows when focused');
  await focusShows(page, 'the skip link');
  await page.keyboard.press('Enter');
  check(await page.evaluate(() => document.activeElement?.id) === 'main', 'the skip link moves the focus to the main content');
  log('the skip link is the first stop and moves the focus to the main content');

  // --- Create a token: Tab to the form, fill it, submit -------------------------------------------
  const nav = page.getByRole('navigation', { name: 'Console' });
  await tabTo(page, nav.getByRole('link', { name: 'API tokens' }), 'the API tokens link', 'Shift+Tab');
  await focusShows(page, 'a navigation link');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
  await checkPage(page, 'the API tokens page');
  const nameField = page.getByRole('textbox', { name: 'Name', exact: true });
  await tabTo(page, page.getByRole('link', { name: 'Create an API token' }), 'the "Create an API token" link');
  await page.keyboard.press('Enter');
  await tabTo(page, nameField, 'the name field');
  await focusShows(page, 'a text field');

  // The rule takes 120 characters, which a browser's maxlength counts in UTF-16 units: the field
  // stops no one short of it (100 emoji are 200 units), and stops typing at twice the rule, past
  // which nothing is a name (the server's refusal between comes back as sent).
  const emoji = '\u{1F511}'.repeat(100);
  await page.keyboard.insertText(emoji);
  check((await nameField.inputValue()) === emoji, `the name field takes 100 emoji (${[...await nameField.inputValue()].length})`);
  await page.keyboard.press('ControlOrMeta+A');
  await page.keyboard.type('x'.repeat(250));
  check((await nameField.inputValue()) === 'x'.repeat(240), `the name field stops at 240 UTF-16 units (${(await nameField.inputValue()).length})`);
  // A blank name and a malformed scope: both refused, each at its field.
  await page.keyboard.press('ControlOrMeta+A');
  await page.keyboard.type('   ');
  await tabTo(page, page.getByRole('textbox', { name: /^Other scopes/ }), 'the other scopes field');
  await page.keyboard.type('bad;scope');
  await tabTo(page, page.getByRole('button', { name: 'Create token' }), 'the create button');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
  check((await page.title()).startsWith('Error: '), `a refused form's title says so (${await page.title()})`);
  const summary = page.getByRole('alert');
  check(await focused(summary), 'the focus moves to the error summary');
  for (const [field, locator] of [['name', nameField], ['other_scopes', page.getByRole('textbox', { name: /^Other scopes/ })]]) {
    check(await locator.getAttribute('aria-invalid') === 'true', `the ${field} field is marked invalid`);
    const said = await description(locator);
    check(said.length > 0 && (await summary.textContent()).includes(said.replace(/^Error: /, '').trim()),
      `the ${field} field is described by its error, as the summary says it (${said})`);
    check(await summary.locator(`a[href="#${field}"]`).count() === 1, `the summary links to the ${field} field`);
  }
  check((await nameField.inputValue()) === '   ', 'the refused form keeps what was typed');
  await checkPage(page, 'a refused create form');
  await tabTo(page, summary.locator('a[href="#name"]'), 'the summary\'s link to the name field');
  await page.keyboard.press('Enter');
  check(await focused(nameField), 'the summary\'s link moves the focus to the field');
  await page.keyboard.press('ControlOrMeta+A');
  await page.keyboard.type('kbd-deploy');
  await tabTo(page, page.getByRole('textbox', { name: /^Other scopes/ }), 'the other scopes field');
  await page.keyboard.press('ControlOrMeta+A');
  await page.keyboard.press('Backspace');
  const scope = page.getByRole('checkbox', { name: 'api_tokens:read' });
  await tabTo(page, scope, 'the api_tokens:read checkbox', 'Shift+Tab');
  await page.keyboard.press('Space');
  check(await scope.isChecked(), 'Space checks a scope');
  await tabTo(page, page.getByRole('button', { name: 'Create token' }), 'the create button');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Store this secret now', level: 1 }).waitFor();
  log('created a token with the keyboard; refused fields are summarised, linked and described');

  // --- The secret, once: reached, selected and copied with the keyboard ---------------------------
  await checkPage(page, 'the secret page');
  const secretField = page.getByRole('textbox', { name: /^Secret of/ });
  await tabTo(page, secretField, 'the secret');
  const secret = await secretField.inputValue();
  check(/^aether_[0-9a-f]{20,}/.test(secret), `the secret is in the field (${secret.slice(0, 7)}…)`);
  check(await secretField.getAttribute('readonly') !== null, 'the secret field is read-only');
  check(await secretField.getAttribute('autocomplete') === 'off', 'the secret field has autocomplete="off"');
  check((await description(secretField)).includes('shown only now'), 'the secret field says it is shown once');
  await page.keyboard.press('ControlOrMeta+A');
  check(await secretField.evaluate((el) => el.selectionStart === 0 && el.selectionEnd === el.value.length),
    'Ctrl+A in the field selects the whole secret, to copy');
  const copy = page.getByRole('button', { name: /^Copy/ });
  await tabTo(page, copy, 'the copy button');
  const leaked = await page.evaluate((secret) => {
    const places = [document.title, location.href];
    for (const el of document.querySelectorAll('*')) {
      for (const attribute of el.attributes) {
        if (attribute.name !== 'value') places.push(attribute.value);
      }
    }
    return places.filter((text) => text.includes(secret));
  }, secret);
  check(leaked.length === 0, `the secret is in no title, URL or attribute but the field's value (${leaked.length})`);
  const stored = page.getByRole('checkbox', { name: 'I have stored it' });
  await tabTo(page, stored, '"I have stored it"');
  await page.keyboard.press('Space');
  await tabTo(page, page.getByRole('button', { name: 'Done' }), 'the Done button');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'API tokens', level: 1 }).waitFor();
  log('the secret is reached, selected and copied with the keyboard, and is said to be shown once');

  // --- Each dangerous control names what it acts on ----------------------------------------------
  const names = await page.evaluate(() => [...document.querySelectorAll('main a, main button')]
    .filter((el) => /^(Revoke|Rotate|Delete)/.test((el.getAttribute('aria-label') || el.textContent).trim()))
    .map((el) => (el.getAttribute('aria-label') || el.textContent).trim()));
  check(names.length >= 4 && new Set(names).size === names.length, `no two rotate or revoke controls share a name (${names})`);
  await tabTo(page, page.getByRole('link', { name: 'Rotate kbd-deploy' }), 'the rotate link of kbd-deploy');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Rotate kbd-deploy', level: 1 }).waitFor();
  await checkPage(page, 'the rotate page');
  check(await page.getByRole('button', { name: 'Rotate API token kbd-deploy' }).count() === 1,
    'the rotate button names the token');
  // A past expiry: the rotate form comes back as sent, the problem summarised, linked and described.
  const expiryDate = page.getByLabel(/^or on this date/);
  await expiryDate.fill('2020-01-01');
  await page.getByRole('radio', { name: 'for 1 hour' }).check();
  await page.getByRole('button', { name: 'Rotate API token kbd-deploy' }).click();
  await page.getByRole('heading', { name: 'Rotate kbd-deploy', level: 1 }).waitFor();
  check((await page.title()).startsWith('Error: '), `a refused rotation's title says so (${await page.title()})`);
  const rotateSummary = page.getByRole('alert');
  check(await focused(rotateSummary), 'the focus moves to the rotation\'s error summary');
  check(await rotateSummary.locator('a[href="#expires_on"]').count() === 1, 'the summary links to the expiry date');
  check(await expiryDate.getAttribute('aria-invalid') === 'true', 'the expiry date is marked invalid');
  check((await description(expiryDate)).length > 0, 'the expiry date is described by its error');
  check((await expiryDate.inputValue()) === '2020-01-01', 'the refused rotation keeps the date typed');
  check(await page.getByRole('radio', { name: 'for 1 hour' }).isChecked(), 'the refused rotation keeps the grace chosen');
  await checkPage(page, 'a refused rotation');
  // A choice no form offers (a stale or crafted form) comes back as sent too, at the choice.
  await expiryDate.fill('');
  await page.evaluate(() => { document.querySelector('#expires_in_days').options[0].value = 'soon'; });
  await page.getByRole('button', { name: 'Rotate API token kbd-deploy' }).click();
  await page.locator('#expires_in_days-error').waitFor();
  const expiryChoice = page.getByRole('combobox', { name: 'Expires', exact: true });
  check(await expiryChoice.getAttribute('aria-invalid') === 'true', 'an expiry no form offers marks the choice invalid');
  check((await description(expiryChoice)).includes('Choose an expiry from the list'), 'and is the choice\'s description');
  check(await page.getByRole('radio', { name: 'for 1 hour' }).isChecked(), 'the refused rotation keeps the grace chosen');
  // A page that is not there: the console's own, with its navigation when signed in.
  await page.goto(`${URL}/console/no-such-page`);
  await page.getByRole('link', { name: 'Back to the console' }).waitFor();
  check(await page.getByRole('navigation', { name: 'Console' }).count() === 1,
    'a signed-in error page keeps the console\'s navigation');
  await checkPage(page, 'a signed-in error page');
  await page.goto(`${URL}/console/api-tokens`);
  await tabTo(page, page.getByRole('link', { name: 'Revoke kbd-deploy' }), 'the revoke link of kbd-deploy');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Revoke kbd-deploy', level: 1 }).waitFor();
  await checkPage(page, 'the revoke page');
  await tabTo(page, page.getByRole('button', { name: 'Revoke API token kbd-deploy' }), 'the button that revokes kbd-deploy');
  await focusShows(page, 'the revoke button');
  await page.keyboard.press('Enter');
  await page.getByRole('status').filter({ hasText: 'Revoked API token' }).waitFor();
  log('rotate and revoke controls name their token; revoked with the keyboard');

  // --- The other pages' structure ------------------------------------------------------------------
  for (const [path, what] of [
    ['/console/service-accounts', 'the service accounts page'],
    ['/console/registry', 'the registry page'],
    ['/console/audit', 'the audit log'],
    ['/console/webhooks', 'the webhooks page'],
  ]) {
    await page.goto(`${URL}${path}`);
    await checkPage(page, what);
  }
  await page.goto(`${URL}/console/api-tokens`);
  await page.locator('td[data-label="Name"] a').first().click();
  await page.getByRole('term').filter({ hasText: 'Created by' }).waitFor();
  await checkPage(page, "a credential's page");
  log('every page has its landmarks, one h1, captioned tables and no axe-core violation');

  // --- The idle limit: a warning before it, with a way to stay signed in (the browser's clock) ---
  await page.clock.install();
  await page.goto(`${URL}/console/api-tokens`);
  await page.clock.fastForward('28:30');
  const warning = page.getByRole('alertdialog');
  await warning.waitFor();
  check((await warning.textContent()).includes('ends in 2 minutes'), 'two minutes before the idle limit a warning says so');
  const stay = page.getByRole('button', { name: 'Stay signed in' });
  check(await focused(stay), 'the focus moves to "Stay signed in"');
  await page.keyboard.press('Enter');
  await warning.waitFor({ state: 'hidden' });
  await page.clock.fastForward('30:00');
  const again = page.getByRole('link', { name: 'Sign in again' });
  await again.waitFor();
  check(await focused(again), 'once the limit passes, the focus moves to "Sign in again"');
  check((await again.getAttribute('href')).includes('next=%2Fconsole%2Fapi-tokens'), 'which comes back to this page');
  log('a warning before the idle limit keeps the session with the keyboard; past it, a way to sign in again');

  // --- A session that ended gives a way back to where the user was -------------------------------
  const cookie = (await context.cookies()).find((c) => c.name === 'keyplane_session');
  await page.goto(`${URL}/console/audit`);
  await tabTo(page, page.getByRole('button', { name: 'Sign out' }), 'the sign-out button');
  await page.keyboard.press('Enter');
  await page.getByText('You have signed out.').waitFor();
  // Signed out, a page that is not there offers a way to sign in (the same page, hence its title).
  await page.goto(`${URL}/console/no-such-page`);
  const signIn = page.getByRole('link', { name: 'Sign in' });
  await signIn.waitFor();
  check(await focused(signIn), 'signed out, the not-found page puts the focus on "Sign in"');
  titles.delete(await page.title());
  await checkPage(page, 'the signed-out not-found page');
  await context.addCookies([cookie]);
  await page.goto(`${URL}/console/audit?outcome=denied`);
  const ended = page.getByRole('status').filter({ hasText: 'Your session has ended' });
  check(await ended.count() === 1, 'a request with a session that ended says so on the sign-in page');
  await checkPage(page, 'the sign-in page');
  check(await focused(tokenField), 'the focus is in the token field');
  await page.keyboard.type(ROOT);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Audit log', level: 1 }).waitFor();
  check(page.url().endsWith('/console/audit?outcome=denied'), `signing in again returns to the page (${page.url()})`);
  log('a session that ended says so, and signing in again returns to the page it was on');
} catch (error) {
  console.error(error.stack || String(error));
  process.exitCode = 1;
} finally {
  await browser.close();
}
