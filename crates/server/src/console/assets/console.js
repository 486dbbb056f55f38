// keyplane console: progressive enhancement only; every page works without this script.
// Loaded from /console/assets (Content-Security-Policy: script-src 'self', no inline script).
'use strict';

document.addEventListener('DOMContentLoaded', () => {
  // Dates: shown in the browser's time zone; the UTC value stays in the title (on hover).
  for (const el of document.querySelectorAll('time[datetime]')) {
    const at = new Date(el.getAttribute('datetime'));
    if (!Number.isNaN(at.getTime())) {
      el.textContent = at.toLocaleString(undefined, {
        year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
        timeZoneName: 'short',
      });
    }
  }

  // Copy buttons: data-copy names the element whose text is copied.
  for (const button of document.querySelectorAll('button[data-copy]')) {
    button.hidden = false;
    button.addEventListener('click', async () => {
      const source = document.getElementById(button.dataset.copy);
      const status = document.getElementById(button.dataset.status);
      if (!source) return;
      const text = 'value' in source ? source.value : source.textContent;
      let done = false;
      try {
        await navigator.clipboard.writeText(text);
        done = true;
      } catch (_) {
        source.focus();
        source.select();
        done = document.execCommand('copy');
      }
      if (status) status.textContent = done ? 'Copied.' : 'Select the text and copy it.';
    });
  }

  // A one-time secret's field: selected whole when it gets the focus, ready to copy.
  for (const field of document.querySelectorAll('input.secret')) {
    field.addEventListener('focus', () => field.select());
  }

  // An error summary's links move the focus to their field (not only scroll to it).
  for (const link of document.querySelectorAll('.error-summary a[href^="#"]')) {
    link.addEventListener('click', (event) => {
      const field = document.getElementById(link.getAttribute('href').slice(1));
      if (!field) return;
      event.preventDefault();
      field.focus();
    });
  }

  // "I have stored it": the button that leaves the secret page waits for the checkbox.
  for (const box of document.querySelectorAll('input[data-enables]')) {
    const target = document.getElementById(box.dataset.enables);
    if (!target) continue;
    target.disabled = !box.checked;
    box.addEventListener('change', () => { target.disabled = !box.checked; });
  }

  // The session's limits (WCAG 2.2.1): two minutes before the idle limit a dialog offers to stay
  // signed in; before the fixed end it warns; once the session has ended it links to the sign-in,
  // which comes back to this page.
  const idle = Number(document.body.dataset.sessionIdle) * 1000;
  const ends = Date.parse(document.body.dataset.sessionEnds);
  const main = document.querySelector('main');
  if (idle > 0 && main) {
    const warnBefore = Math.min(120_000, idle / 2);
    // The idle limit may be a minute: the warning then comes 30 seconds before, and says so.
    const inWords = (ms) => {
      const seconds = Math.round(ms / 1000);
      if (seconds % 60 !== 0) return `${seconds} seconds`;
      return seconds === 60 ? '1 minute' : `${seconds / 60} minutes`;
    };
    const back = window.location.pathname + window.location.search;
    const box = document.createElement('div');
    box.className = 'session-warning';
    box.setAttribute('role', 'alertdialog');
    box.setAttribute('aria-labelledby', 'session-warning-text');
    box.tabIndex = -1;
    box.hidden = true;
    const text = document.createElement('p');
    text.id = 'session-warning-text';
    const stay = document.createElement('button');
    stay.type = 'button';
    stay.textContent = 'Stay signed in';
    const again = document.createElement('a');
    again.href = `/console/login?${new URLSearchParams({ next: back, ended: '1' })}`;
    again.textContent = 'Sign in again';
    box.append(text, stay, again);
    main.prepend(box);
    let before = null;
    let timers = [];
    const show = (message, canStay) => {
      if (box.hidden) before = document.activeElement;
      text.textContent = message;
      stay.hidden = !canStay;
      again.hidden = canStay;
      box.hidden = false;
      (canStay ? stay : again).focus();
    };
    const ended = () => show('Your session has ended. Sign in again to go on from this page.', false);
    const schedule = () => {
      timers.forEach(clearTimeout);
      const now = Date.now();
      const idleEnd = now + idle;
      if (!Number.isNaN(ends) && ends <= idleEnd) {
        // The fixed end comes first: no activity extends it.
        const at = new Date(ends).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
        timers = [
          setTimeout(() => show(`Your session ends at ${at}, when it reaches its longest time; sign in again then.`, false), Math.max(0, ends - warnBefore - now)),
          setTimeout(ended, Math.max(0, ends - now)),
        ];
      } else {
        timers = [
          setTimeout(() => show(`Your session ends in ${inWords(warnBefore)} without activity.`, true), Math.max(0, idle - warnBefore)),
          setTimeout(ended, idle),
        ];
      }
    };
    stay.addEventListener('click', async () => {
      try {
        const answer = await fetch('/console/session', { redirect: 'manual', cache: 'no-store' });
        if (answer.status === 204) {
          box.hidden = true;
          if (before && document.contains(before)) before.focus();
          schedule();
          return;
        }
      } catch (_) {
        // Unreachable: the session is treated as ended; signing in again comes back here.
      }
      ended();
    });
    schedule();
  }

  // After "Sign in with …": continue with a same-site navigation, so the SameSite=Strict
  // session cookie is sent.
  const next = document.querySelector('a[data-continue]');
  if (next) window.location.replace(next.getAttribute('href'));

  // Focus the first field marked for it (sign-in, errors).
  const focus = document.querySelector('[data-autofocus]');
  if (focus) focus.focus();
});
