//! Captures every log line the in-process servers write, to check that no secret is ever logged.

use keyplane_store::testing::Backend;
use std::io::Write;
use std::sync::{Mutex, Once, OnceLock};

fn buffer() -> &'static Mutex<Vec<u8>> {
    static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    BUFFER.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        buffer().lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber at `trace` level, once per test binary.
pub fn capture() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| Capture)
            .init();
    });
}

pub fn captured() -> String {
    String::from_utf8_lossy(&buffer().lock().unwrap()).into_owned()
}

use crate::helpers::{both_backends, TestApp};
use serde_json::json;

/// create → use → rotate → revoke, with every secret checked against everything logged.
async fn no_secret_is_ever_logged(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "ci", &["api_tokens:read"]).await;
    let first = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        app.get(&org.path("/api-tokens"), &first).await.status(),
        200
    );
    // A wrong-but-well-formed secret and garbage are rejected and must not be logged either.
    let garbage = "aether_not-a-real-token-but-secret-looking";
    assert_eq!(
        app.get(&org.path("/api-tokens"), garbage).await.status(),
        401
    );
    let rotated: serde_json::Value = app
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let second = rotated["token"].as_str().unwrap().to_string();
    assert_eq!(
        app.get(&org.path("/api-tokens"), &first).await.status(),
        401
    );
    assert_eq!(
        app.delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await
            .status(),
        204
    );
    app.app.flush_usage().await;

    let logs = captured();
    assert!(
        logs.contains("credential rotated"),
        "the capture works: {}",
        logs.len()
    );
    for secret in [first.as_str(), second.as_str(), org.token.as_str(), garbage] {
        assert!(!logs.contains(secret), "a secret reached the logs");
        // Not even the random part on its own.
        assert!(
            !logs.contains(&secret[7..]),
            "a secret's body reached the logs"
        );
    }
}

both_backends!(no_secret_is_ever_logged);
