//! The console's stylesheet and script, compiled into the binary (nothing is fetched from another
//! host) and served under names carrying a hash of their content, so browsers may cache them for
//! good and a new build is never served stale.

use super::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

pub(crate) struct Names {
    pub css: String,
    pub js: String,
}

fn hashed(stem: &str, ext: &str, content: &str) -> String {
    let digest = Sha256::digest(content.as_bytes());
    format!(
        "{stem}-{}.{ext}",
        data_encoding::HEXLOWER.encode(&digest[..8])
    )
}

pub(crate) fn names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| Names {
        css: hashed("console", "css", CSS),
        js: hashed("console", "js", JS),
    })
}

pub(crate) async fn serve(Path(name): Path<String>) -> Response {
    let names = names();
    let (content, kind) = if name == names.css {
        (CSS, "text/css; charset=utf-8")
    } else if name == names.js {
        (JS, "text/javascript; charset=utf-8")
    } else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        content,
    )
        .into_response()
}
