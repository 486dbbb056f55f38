//! Lists the platforms answer whole (a bare JSON array, or `{"items": [...]}`), written as the
//! store is read a page at a time: a tenant with a million credentials or grants costs a request
//! one page of memory, not the whole list several times over.

use crate::app::App;
use crate::error::AppError;
use crate::ops::{self, KindRights, ListSpec};
use crate::wire::json_response;
use axum::body::{Body, Bytes};
use axum::response::Response;
use futures::StreamExt;
use keyplane_core::{Credential, Principal, TenantId};
use serde::Serialize;
use std::future::Future;
use tracing::Instrument;

/// Rows read from the store at a time for a streamed list.
pub const LIST_PAGE_ROWS: u32 = 500;

/// One page, and the cursor of the next if there is one.
pub type Page<T, C> = (Vec<T>, Option<C>);

/// What surrounds the array: the same bytes `axum::Json` writes for the whole answer.
#[derive(Debug, Clone, Copy)]
pub struct Envelope {
    open: &'static str,
    close: &'static str,
}

/// The answer is the array itself.
pub const BARE: Envelope = Envelope {
    open: "",
    close: "",
};

/// The answer is `{"items": <array>}`.
pub const ITEMS: Envelope = Envelope {
    open: "{\"items\":",
    close: "}",
};

/// The answer to a list read with `fetch` (called with the previous page's cursor, `None` first).
/// The first page is read before anything is answered, so its errors (and the authorization
/// `fetch` checks) are the response; a list of one page is answered with a `Content-Length` as
/// before. A later page that cannot be read ends the body early (the client sees a truncated
/// body), and is logged.
pub async fn json_array<T, C, F, Fut>(
    envelope: Envelope,
    mut fetch: F,
) -> Result<Response, AppError>
where
    T: Serialize + Send + 'static,
    C: Send + 'static,
    F: FnMut(Option<C>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Page<T, C>, AppError>> + Send + 'static,
{
    let (items, next) = fetch(None).await?;
    let mut head = format!("{}[", envelope.open).into_bytes();
    let wrote_any = write_items(&mut head, &items, false)?;
    let Some(cursor) = next else {
        head.push(b']');
        head.extend_from_slice(envelope.close.as_bytes());
        return Ok(json_response(Body::from(head)));
    };
    // Later pages are read while the body is written, outside the handler: logged under the
    // request's span all the same.
    let span = tracing::Span::current();
    let rest = futures::stream::unfold(Some((cursor, wrote_any, fetch)), move |state| {
        let span = span.clone();
        async move {
            let (cursor, wrote_any, mut fetch) = state?;
            let page = fetch(Some(cursor)).instrument(span.clone()).await;
            let written = page.and_then(|(items, next)| {
                let mut chunk = Vec::new();
                let wrote_any = write_items(&mut chunk, &items, wrote_any)?;
                if next.is_none() {
                    chunk.push(b']');
                    chunk.extend_from_slice(envelope.close.as_bytes());
                }
                Ok((chunk, next.map(|cursor| (cursor, wrote_any))))
            });
            Some(match written {
                Ok((chunk, next)) => (
                    Ok(Bytes::from(chunk)),
                    next.map(|(cursor, wrote_any)| (cursor, wrote_any, fetch)),
                ),
                Err(error) => {
                    span.in_scope(|| {
                        tracing::error!(%error, "a list's next page cannot be read: its answer ends early");
                    });
                    (
                        Err(std::io::Error::other("a list's next page cannot be read")),
                        None,
                    )
                }
            })
        }
    });
    let body = futures::stream::once(std::future::ready(Ok(Bytes::from(head)))).chain(rest);
    Ok(json_response(Body::from_stream(body)))
}

/// The credentials of one kind `spec` picks (its `after` and `limit` aside: all of them), each
/// answered as `view` shows it.
pub async fn credentials<T: Serialize + Send + 'static>(
    app: App,
    who: Principal,
    tenant: TenantId,
    rights: KindRights,
    spec: ListSpec,
    envelope: Envelope,
    view: fn(Credential) -> T,
) -> Result<Response, AppError> {
    json_array(envelope, move |after| {
        let (app, who) = (app.clone(), who.clone());
        async move {
            let page = ListSpec {
                after,
                limit: Some(LIST_PAGE_ROWS),
                ..spec
            };
            let (credentials, next) =
                ops::list_credentials(&app, &who, tenant, rights, page).await?;
            Ok((credentials.into_iter().map(view).collect(), next))
        }
    })
    .await
}

/// Appends `items` to an array under way (after a comma if it has some already); whether it has
/// some now.
fn write_items<T: Serialize>(
    out: &mut Vec<u8>,
    items: &[T],
    mut wrote_any: bool,
) -> Result<bool, AppError> {
    for item in items {
        if wrote_any {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, item).map_err(|e| {
            AppError::Internal(anyhow::anyhow!("a list item does not serialize: {e}"))
        })?;
        wrote_any = true;
    }
    Ok(wrote_any)
}
