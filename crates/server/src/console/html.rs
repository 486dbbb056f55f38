//! The console's HTML: small functions that return escaped markup. Every value from a user or the
//! store passes through [`esc`]; there are no template files, no inline script and no inline
//! style (the Content-Security-Policy forbids both).

use chrono::{DateTime, SecondsFormat, Utc};
use std::fmt::Write;

/// HTML-escapes text for element content and double-quoted attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A point in time: UTC in the markup and on hover; the script rewrites the text in the browser's
/// time zone.
pub(crate) fn time(at: &DateTime<Utc>) -> String {
    let utc = at.to_rfc3339_opts(SecondsFormat::Secs, true);
    let shown = at.format("%Y-%m-%d %H:%M UTC");
    format!("<time datetime=\"{utc}\" title=\"{utc}\">{shown}</time>")
}

pub(crate) fn maybe_time(at: Option<&DateTime<Utc>>, none: &str) -> String {
    at.map_or_else(|| esc(none), time)
}

/// The `maxlength` of a field whose rule allows `chars` characters: browsers count it in UTF-16
/// units, two for a character past U+FFFF (an emoji), so the rule's own number would stop a user
/// at half of it. Past the rule, the server's refusal brings the form back as sent.
pub(crate) fn utf16_room(chars: usize) -> usize {
    2 * chars
}

/// The hidden CSRF field every state-changing form carries.
pub(crate) fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// A POST form around `inner` (buttons and fields), with the CSRF field.
pub(crate) fn post_form(action: &str, csrf: &str, class: &str, inner: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"{class}\">{}{inner}</form>",
        esc(action),
        csrf_field(csrf)
    )
}

/// A navigation entry of the signed-in layout.
pub(crate) struct NavItem {
    pub href: &'static str,
    pub label: &'static str,
}

/// What the signed-in layout shows around a page.
pub(crate) struct Frame<'a> {
    pub who: &'a str,
    pub tenant_name: &'a str,
    /// The other organizations the principal holds rights in (a user may have several).
    pub other_tenants: &'a [(uuid::Uuid, String)],
    pub csrf: &'a str,
    pub nav: Vec<NavItem>,
    pub current: &'static str,
    pub notice: Option<String>,
    /// The page shows a refused form again: its title says so first, as screen readers read it.
    pub refused: bool,
    /// The session's idle limit and fixed end, for the script's warning before either.
    pub idle: std::time::Duration,
    pub ends_at: DateTime<Utc>,
}

/// A field a refused form shows again with what was wrong: `field` is its element's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldProblem {
    pub field: String,
    /// The field's label, which the summary names it by.
    pub label: String,
    pub message: String,
}

/// What a form sent, to show it again with its problems (never a secret: no console form takes
/// one but the sign-in, which is not shown again).
#[derive(Debug, Default)]
pub(crate) struct Refill {
    pub values: Vec<(String, String)>,
    pub problems: Vec<FieldProblem>,
}

impl Refill {
    /// The value sent for `key`, or `fallback` when the form is new.
    pub(crate) fn value<'a>(&'a self, key: &str, fallback: &'a str) -> &'a str {
        if self.problems.is_empty() {
            return fallback;
        }
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Whether `value` was among those sent for `key` (checkboxes).
    pub(crate) fn sent(&self, key: &str, value: &str) -> bool {
        self.values.iter().any(|(k, v)| k == key && v == value)
    }

    /// The attributes and message of `field`: `aria-invalid` and `aria-describedby` (after the
    /// ids in `hints`) naming its message, shown under it; nothing when it has no problem.
    pub(crate) fn field(&self, field: &str, hints: &str) -> (String, String) {
        let Some(problem) = self.problems.iter().find(|p| p.field == field) else {
            return if hints.is_empty() {
                (String::new(), String::new())
            } else {
                (format!(" aria-describedby=\"{hints}\""), String::new())
            };
        };
        let described = if hints.is_empty() {
            format!("{field}-error")
        } else {
            format!("{hints} {field}-error")
        };
        (
            format!(" aria-invalid=\"true\" aria-describedby=\"{described}\""),
            format!(
                "<span class=\"field-error\" id=\"{field}-error\">\
                 <span class=\"visually-hidden\">Error: </span>{}</span>",
                esc(&problem.message)
            ),
        )
    }

    /// The summary at the top of a refused form: announced (`role="alert"`), focused by the
    /// script, and linking to each field it names.
    pub(crate) fn summary(&self) -> String {
        if self.problems.is_empty() {
            return String::new();
        }
        let mut items = String::new();
        for problem in &self.problems {
            let _ = write!(
                items,
                "<li><a href=\"#{}\">{}: {}</a></li>",
                esc(&problem.field),
                esc(&problem.label),
                esc(&problem.message)
            );
        }
        format!(
            "<div class=\"error error-summary\" role=\"alert\" tabindex=\"-1\" data-autofocus \
             aria-labelledby=\"error-summary-title\"><h2 id=\"error-summary-title\">The form \
             was not accepted</h2><ul>{items}</ul></div>"
        )
    }
}

/// A whole page; `body` holds the `<body>` element's attributes.
pub(crate) fn document(title: &str, body: &str, header: &str, main: &str) -> String {
    let assets = super::assets::names();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"referrer\" content=\"no-referrer\">\
         <title>{title} · keyplane</title>\
         <link rel=\"stylesheet\" href=\"/console/assets/{css}\">\
         <script src=\"/console/assets/{js}\" defer></script></head>\
         <body{body}><a class=\"skip\" href=\"#main\">Skip to content</a>{header}\
         <main id=\"main\" tabindex=\"-1\">{main}</main></body></html>",
        title = esc(title),
        css = assets.css,
        js = assets.js,
    )
}

/// A page of the signed-in console.
pub(crate) fn page(frame: &Frame<'_>, title: &str, body: &str) -> String {
    let mut nav = String::new();
    for item in &frame.nav {
        let current = if item.href == frame.current {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(
            nav,
            "<li><a href=\"{}\"{current}>{}</a></li>",
            item.href, item.label
        );
    }
    let switcher = if frame.other_tenants.is_empty() {
        String::new()
    } else {
        let mut options = format!(
            "<option value=\"\" selected>{}</option>",
            esc(frame.tenant_name)
        );
        for (id, name) in frame.other_tenants {
            let _ = write!(options, "<option value=\"{id}\">{}</option>", esc(name));
        }
        post_form(
            "/console/organization",
            frame.csrf,
            "inline",
            &format!(
                " <label for=\"organization\" class=\"hint\">Organization</label> \
                 <select id=\"organization\" name=\"organization\" required>{options}</select> \
                 <button type=\"submit\" class=\"secondary\">Switch</button>"
            ),
        )
    };
    let header = format!(
        "<header class=\"top\"><div class=\"brand\"><a href=\"/console\">keyplane</a>\
         <span class=\"tenant\">{tenant}</span>{switcher}</div>\
         <nav aria-label=\"Console\"><ul>{nav}</ul></nav>\
         <div class=\"who\"><span>Signed in as <strong>{who}</strong></span>{signout}</div></header>",
        tenant = esc(frame.tenant_name),
        who = esc(frame.who),
        signout = post_form(
            "/console/logout",
            frame.csrf,
            "inline",
            "<button type=\"submit\" class=\"link\">Sign out</button>"
        ),
    );
    let notice = frame.notice.as_deref().map_or(String::new(), |text| {
        format!("<p class=\"notice\" role=\"status\">{}</p>", esc(text))
    });
    let session = format!(
        " data-session-idle=\"{}\" data-session-ends=\"{}\"",
        frame.idle.as_secs(),
        frame.ends_at.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    document(
        &titled(title, frame.refused),
        &session,
        &header,
        &format!("<h1>{}</h1>{notice}{body}", esc(title)),
    )
}

/// A page's `<title>`: "Error: " first on a page that shows a refusal.
fn titled(title: &str, refused: bool) -> String {
    if refused {
        format!("Error: {title}")
    } else {
        title.to_string()
    }
}

/// A page outside the signed-in console (sign-in, errors before a session); `refused`: it shows
/// a refusal.
pub(crate) fn bare_page(title: &str, refused: bool, body: &str) -> String {
    document(
        &titled(title, refused),
        "",
        "<header class=\"top\"><div class=\"brand\"><a href=\"/console\">keyplane</a></div></header>",
        &format!("<h1>{}</h1>{body}", esc(title)),
    )
}

/// A text that may be long (ids, scopes): kept whole for screen readers and copying.
pub(crate) fn code(text: &str) -> String {
    format!("<code>{}</code>", esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
