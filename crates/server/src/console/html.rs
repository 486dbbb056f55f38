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
}

pub(crate) fn document(title: &str, header: &str, main: &str) -> String {
    let assets = super::assets::names();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"referrer\" content=\"no-referrer\">\
         <title>{title} · keyplane</title>\
         <link rel=\"stylesheet\" href=\"/console/assets/{css}\">\
         <script src=\"/console/assets/{js}\" defer></script></head>\
         <body><a class=\"skip\" href=\"#main\">Skip to content</a>{header}\
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
    document(
        title,
        &header,
        &format!("<h1>{}</h1>{notice}{body}", esc(title)),
    )
}

/// A page outside the signed-in console (sign-in, errors before a session).
pub(crate) fn bare_page(title: &str, body: &str) -> String {
    document(
        title,
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
