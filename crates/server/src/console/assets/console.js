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

  // After "Sign in with …": continue with a same-site navigation, so the SameSite=Strict
  // session cookie is sent.
  const next = document.querySelector('a[data-continue]');
  if (next) window.location.replace(next.getAttribute('href'));

  // Focus the first field marked for it (sign-in, errors).
  const focus = document.querySelector('[data-autofocus]');
  if (focus) focus.focus();
});
