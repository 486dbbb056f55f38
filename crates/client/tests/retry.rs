//! Retries against a scripted HTTP server on 127.0.0.1: a create answered 503 is sent again with
//! the same `Idempotency-Key` (so the server can replay instead of minting twice); a read
//! answered 503 is not retried (only a 429, which says nothing was done, is).

use keyplane_api_types::aether::CreateApiTokenRequest;
use keyplane_client::{Client, Error, Page, Plaintext};
use keyplane_core::ScopeSet;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(10);

/// Answers each connection with the next of `answers` (status line and body), closing it after;
/// returns each request's `idempotency-key` header (or "").
async fn scripted(
    answers: Vec<(&'static str, &'static str)>,
) -> (String, tokio::task::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut keys = Vec::new();
        for (status, body) in answers {
            let Ok(Ok((mut socket, _))) = tokio::time::timeout(LIMIT, listener.accept()).await
            else {
                break;
            };
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            // The head, then as much body as Content-Length says.
            loop {
                let n = socket.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length || n == 0 {
                        keys.push(
                            text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("idempotency-key: ")
                                        .map(str::to_string)
                                })
                                .unwrap_or_default(),
                        );
                        break;
                    }
                }
                assert!(n > 0, "the client hung up mid-request");
            }
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 0\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
        }
        keys
    });
    (url, server)
}

const CREATED: &str = r#"{"id":"01a2378e-befb-71e9-b38b-74c564da670a","org_id":"40cfb09e-3d7f-4a70-8dee-e2987421256f","name":"ci","prefix":"aether_0f284d36","scopes":[],"last_used_at":null,"expires_at":null,"created_at":"2030-01-01T00:00:00Z","previous_secret_expires_at":null,"previous_secret_last_used_at":null,"suspended_at":null,"canary":false,"token":"aether_secret"}"#;
const UNAVAILABLE: &str = r#"{"error":{"code":"unavailable","message":"the store is busy"}}"#;

#[tokio::test]
async fn a_create_answered_503_is_retried_with_the_same_idempotency_key() {
    let (url, server) = scripted(vec![
        ("503 Service Unavailable", UNAVAILABLE),
        ("201 Created", CREATED),
    ])
    .await;
    let client = Client::new(
        &url,
        Some(Plaintext::received("aether_caller".into())),
        false,
    )
    .unwrap();
    let request = CreateApiTokenRequest {
        name: "ci".into(),
        scopes: ScopeSet::empty(),
        expires_at: None,
        canary: false,
    };
    let created = client
        .create_api_token(Uuid::new_v4(), &request)
        .await
        .unwrap();
    assert_eq!(created.token.expose_secret(), "aether_secret");
    let keys = server.await.unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys[0].len() >= 16, "{keys:?}");
    assert_eq!(keys[0], keys[1]);
}

#[tokio::test]
async fn a_read_answered_503_is_reported_not_retried() {
    let (url, server) = scripted(vec![
        ("503 Service Unavailable", UNAVAILABLE),
        ("200 OK", "{}"),
    ])
    .await;
    let client = Client::new(
        &url,
        Some(Plaintext::received("aether_caller".into())),
        false,
    )
    .unwrap();
    let error = match client
        .list_api_tokens(Uuid::new_v4(), &Page::default(), None)
        .await
    {
        Err(error) => error,
        Ok(_) => panic!("a 503 was taken for a page"),
    };
    let Error::Refused(failure) = &error else {
        panic!("{error:?}")
    };
    assert_eq!(
        (failure.status, failure.code.as_deref()),
        (503, Some("unavailable"))
    );
    assert_eq!(error.exit_status() as i32, 1);
    server.abort();
}
