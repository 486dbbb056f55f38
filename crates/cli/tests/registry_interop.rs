//! Interop with the real peers: `keyplane serve` as the token server of a CNCF Distribution
//! registry (Debian's `docker-registry` 2.8.2 with `auth: token`), driven by skopeo the way a CI job
//! would: robot accounts push, pull and delete images, and every refusal a robot should meet comes
//! from the real registry, not from a stub. Then the token endpoint itself, checked claim by claim
//! against what the registry and its clients read.
//!
//! These tests never skip: without `/usr/bin/docker-registry` or `/usr/bin/skopeo` they fail and
//! say how to install them. Every process they start listens on 127.0.0.1 only, every wait is
//! bounded, and every process is killed when the test ends, however it ends.

mod common;

use chrono::{DateTime, TimeDelta, Utc};
use common::{
    both_stores, free_loopback_port, http_client, keyplane, string_field, CommandOutput, Keyplane,
    KillOnDrop, Org, TestStore,
};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const SKOPEO_BIN: &str = "/usr/bin/skopeo";
const INSTALL: &str = "apt-get install -y docker-registry skopeo";
/// The bound on every wait: a process start, a command, an HTTP request, a poll.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The registry's `auth.token.service` (the JWT `aud`) and `auth.token.issuer` (the JWT `iss`).
const SERVICE: &str = "keyplane-interop-registry";
const ISSUER: &str = "keyplane-interop-issuer";

both_stores!(
    robots_push_pull_and_delete_through_a_real_registry,
    token_endpoint_speaks_the_distribution_protocol,
    the_signing_key_rotates_without_downtime,
);

/// The whole robot lifecycle against the real registry, with skopeo as the client.
async fn robots_push_pull_and_delete_through_a_real_registry(backend: Backend) {
    require_peer_tools();
    let started = Utc::now();
    let (store, work, registry_addr, keyplane) = token_server(backend).await;
    let work = work.path();
    let cert = registry_cert(&store).await;
    assert_eq!(
        registry_cert(&store).await,
        cert,
        "`admin registry-cert` must print the same certificate every time"
    );
    let registry = Registry::start(work, &registry_addr, &keyplane.addr, &cert).await;
    let skopeo = Skopeo::new(work, &registry_addr);
    let stack = Stack {
        keyplane: &keyplane,
        registry: &registry,
    };
    let image = build_image(work).await;
    let image_digest = skopeo.oci_digest(&image).await;

    let org = store.bootstrap_org();
    let enabled = keyplane.enable_registry(&org).await;
    assert_eq!(enabled.endpoint, registry_addr, "Registry.endpoint");
    let project = enabled.project.clone();
    let app_v1 = format!("{project}/app:v1");

    // (1) A pull,push robot pushes and pulls back the same image.
    let pusher = keyplane
        .create_robot(&org, &project, "pusher", Some(&["pull", "push"]))
        .await;
    stack.ok(
        skopeo.push(&image, &app_v1, Some(&pusher)).await,
        format!("the pull,push robot pushes {app_v1}"),
    );
    let pulled = work.join("pulled");
    stack.ok(
        skopeo.pull(&app_v1, &pulled, &pusher).await,
        format!("the pull,push robot pulls {app_v1}"),
    );
    assert_eq!(
        skopeo.oci_digest(&pulled).await,
        image_digest,
        "the image pulled back is not the one pushed"
    );
    let remote_digest = stack.ok(
        skopeo.inspect(&app_v1, Some(&pusher)).await,
        format!("the pull,push robot inspects {app_v1}"),
    );
    assert_eq!(remote_digest.trim(), image_digest, "digest in the registry");
    // The default robot `POST /registry` handed out works too.
    stack.ok(
        skopeo.inspect(&app_v1, Some(&enabled.default_robot)).await,
        format!("the default robot (credentials of POST /registry) inspects {app_v1}"),
    );

    // (2) A pull-only robot (permissions omitted: `["pull"]`) pulls but cannot push.
    let puller = keyplane.create_robot(&org, &project, "puller", None).await;
    stack.ok(
        skopeo.pull(&app_v1, &work.join("pulled-ro"), &puller).await,
        format!("the pull-only robot pulls {app_v1}"),
    );
    let other_v1 = format!("{project}/other:v1");
    stack.refused(
        skopeo.push(&image, &other_v1, Some(&puller)).await,
        format!("the pull-only robot pushes {other_v1}"),
    );
    stack.absent(
        skopeo.inspect(&other_v1, Some(&pusher)).await,
        format!("{other_v1} after its push was refused"),
    );

    // (3) Wrong secrets and no credentials are refused by the token service.
    let wrong_secret = Robot {
        secret: "kprobot_0000000000000000000000000000000000000000000000000000000000".into(),
        ..pusher.clone()
    };
    let someone_elses_secret = Robot {
        secret: puller.secret.clone(),
        ..pusher.clone()
    };
    for (what, robot) in [
        ("a made-up secret", &wrong_secret),
        (
            "another robot's secret under this robot's name",
            &someone_elses_secret,
        ),
    ] {
        let out = skopeo.inspect(&app_v1, Some(robot)).await;
        stack.refused(out, format!("login with {what}"));
    }
    stack.refused(
        skopeo.inspect(&app_v1, None).await,
        format!("anonymous inspect of {app_v1}"),
    );

    // (4) A robot of another organization: its own project works, ours does not.
    let other_org = store.create_org("other").await;
    let other = keyplane.enable_registry(&other_org).await;
    assert_ne!(other.project, project, "two orgs share a project");
    let their_robot = &other.default_robot;
    stack.ok(
        skopeo
            .push(
                &image,
                &format!("{}/app:v1", other.project),
                Some(their_robot),
            )
            .await,
        "the other org's default robot pushes into its own project",
    );
    stack.refused(
        skopeo.inspect(&app_v1, Some(their_robot)).await,
        format!("the other org's robot pulls {app_v1}"),
    );
    stack.refused(
        skopeo
            .push(&image, &format!("{project}/planted:v1"), Some(their_robot))
            .await,
        format!("the other org's robot pushes into {project}"),
    );

    // (5) A deleted robot stops at once; a rotated one keeps its id, loses its old secret and works
    // with the new one.
    let doomed = keyplane.create_robot(&org, &project, "doomed", None).await;
    stack.ok(
        skopeo.inspect(&app_v1, Some(&doomed)).await,
        "the robot about to be deleted",
    );
    assert_eq!(
        keyplane.delete_robot(&org, &doomed).await,
        StatusCode::NO_CONTENT
    );
    stack.refused(
        skopeo.inspect(&app_v1, Some(&doomed)).await,
        "a deleted robot",
    );
    let rotor = keyplane.create_robot(&org, &project, "rotor", None).await;
    stack.ok(
        skopeo.inspect(&app_v1, Some(&rotor)).await,
        "the robot about to be rotated",
    );
    let rotated = keyplane.rotate_robot(&org, &rotor, None).await;
    assert_ne!(rotated.secret, rotor.secret, "rotation kept the secret");
    stack.refused(
        skopeo.inspect(&app_v1, Some(&rotor)).await,
        "the old secret of a rotated robot",
    );
    stack.ok(
        skopeo.inspect(&app_v1, Some(&rotated)).await,
        "the new secret of a rotated robot",
    );

    // (5b) Rotation with a grace period: both secrets log in until the grace ends (or the previous
    // one is retired), then only the new one does.
    let graceful = keyplane
        .create_robot(&org, &project, "graceful", None)
        .await;
    let second = keyplane
        .rotate_robot(&org, &graceful, Some(json!({"grace_seconds": 3600})))
        .await;
    for (robot, what) in [(&graceful, "previous"), (&second, "new")] {
        stack.ok(
            skopeo.inspect(&app_v1, Some(robot)).await,
            format!("the {what} secret during the grace period"),
        );
    }
    let (status, body) = keyplane
        .send(
            keyplane
                .http
                .post(keyplane.org_url(
                    &org,
                    &format!("/registry/robot-accounts/{}/retire-previous", graceful.id),
                ))
                .bearer_auth(&org.token),
            "POST retire-previous",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "retire-previous: {body}");
    stack.refused(
        skopeo.inspect(&app_v1, Some(&graceful)).await,
        "the previous secret after retire-previous",
    );
    let grace = Duration::from_secs(2);
    let third = keyplane
        .rotate_robot(
            &org,
            &second,
            Some(json!({"grace_seconds": grace.as_secs()})),
        )
        .await;
    let rotated_at = Instant::now();
    stack.ok(
        skopeo.inspect(&app_v1, Some(&second)).await,
        "the previous secret within a 2 s grace period",
    );
    tokio::time::sleep(grace.saturating_sub(rotated_at.elapsed()) + Duration::from_millis(200))
        .await;
    stack.refused(
        skopeo.inspect(&app_v1, Some(&second)).await,
        "the previous secret after its grace period",
    );
    stack.ok(
        skopeo.inspect(&app_v1, Some(&third)).await,
        "the new secret after the grace period",
    );

    // (6) Deleting a manifest needs `delete`: pull,push is not enough.
    let by_digest = format!("{project}/app@{image_digest}");
    stack.refused(
        skopeo.delete(&by_digest, &pusher).await,
        format!("the pull,push robot deletes {by_digest}"),
    );
    stack.ok(
        skopeo.inspect(&app_v1, Some(&pusher)).await,
        format!("{app_v1} after a refused delete"),
    );
    let deleter = keyplane
        .create_robot(&org, &project, "deleter", Some(&["pull", "delete"]))
        .await;
    stack.ok(
        skopeo.delete(&by_digest, &deleter).await,
        format!("the pull,delete robot deletes {by_digest}"),
    );
    stack.absent(
        skopeo.inspect(&app_v1, Some(&pusher)).await,
        format!("{app_v1} after its manifest was deleted"),
    );

    // (7) Use is recorded: `last_used_at` appears (flushed every 100 ms); an unused robot has none.
    let idle = keyplane.create_robot(&org, &project, "idle", None).await;
    let last_used = keyplane.wait_for_last_used(&org, &pusher).await;
    assert!(
        last_used >= started - TimeDelta::seconds(1) && last_used <= Utc::now(),
        "last_used_at {last_used} is not the time of the test (started {started})"
    );
    keyplane.wait_for_last_used(&org, &deleter).await;
    let idle_view = keyplane.get_robot(&org, &idle).await;
    assert_eq!(
        idle_view["last_used_at"],
        Value::Null,
        "a robot that never logged in has a last_used_at: {idle_view}"
    );
}

/// `GET`/`POST /registry/token` checked directly: the answer's fields, and the JWT's claims as the
/// registry reads them.
async fn token_endpoint_speaks_the_distribution_protocol(backend: Backend) {
    let store = TestStore::new(backend).await;
    let endpoint = "registry.example.test:5000";
    let keyplane = Keyplane::start_as_token_server(&store, endpoint).await;
    let org = store.bootstrap_org();
    let enabled = keyplane.enable_registry(&org).await;
    assert_eq!(enabled.endpoint, endpoint);
    let project = enabled.project.clone();
    let ci = keyplane
        .create_robot(&org, &project, "ci", Some(&["pull", "push"]))
        .await;
    let reader = keyplane.create_robot(&org, &project, "reader", None).await;
    let other_org = store.create_org("other").await;
    let other = keyplane.enable_registry(&other_org).await;

    let app = format!("repository:{project}/app");
    let before = Utc::now();
    let answer = keyplane
        .token(&ci, &[("scope", &format!("{app}:pull,push"))])
        .await;
    let after = Utc::now();
    // Distribution 3.x trusts the key by the certificate in `x5c` (2.8 reads it first too).
    answer.assert_signed_by(&registry_cert(&store).await);
    let claims = answer.claims;
    assert_eq!(
        claims["aud"],
        json!(SERVICE),
        "aud must be one plain string (Distribution 2.x rejects an array): {claims}"
    );
    assert_eq!(claims["iss"], ISSUER, "iss in {claims}");
    assert_eq!(claims["sub"], ci.username(), "sub in {claims}");
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": format!("{project}/app"), "actions": ["pull", "push"]}]),
        "access in {claims}"
    );
    let iat = claims["iat"].as_i64().expect("iat is a number");
    let exp = claims["exp"]
        .as_i64()
        .expect("exp is required by the registry");
    let nbf = claims["nbf"].as_i64().unwrap_or(iat);
    assert!(
        (before.timestamp() - 1..=after.timestamp() + 1).contains(&iat),
        "iat {iat} is not now"
    );
    assert!(
        nbf <= iat,
        "nbf {nbf} is after iat {iat}: the registry would refuse the token for a while"
    );
    assert_eq!(exp - iat, answer.expires_in, "exp - iat vs expires_in");
    let issued_at = answer.issued_at;
    assert!(
        issued_at >= before - TimeDelta::seconds(1) && issued_at <= after + TimeDelta::seconds(1),
        "issued_at {issued_at} is not now"
    );
    assert_eq!(issued_at.timestamp(), iat, "issued_at vs iat");

    // Only what the robot's permissions allow, asked scope by scope.
    let access = |answer: TokenAnswer| answer.claims["access"].clone();
    assert_eq!(
        access(
            keyplane
                .token(&reader, &[("scope", &format!("{app}:pull,push"))])
                .await
        ),
        json!([{"type": "repository", "name": format!("{project}/app"), "actions": ["pull"]}]),
        "a pull-only robot asking for pull,push"
    );
    assert_eq!(
        access(
            keyplane
                .token(&reader, &[("scope", &format!("{app}:push"))])
                .await
        ),
        json!([]),
        "a pull-only robot asking for push only gets no access entry"
    );
    // Nothing in another organization's project, even next to a scope of its own.
    let theirs = format!("repository:{}/app:pull", other.project);
    assert_eq!(
        access(keyplane.token(&ci, &[("scope", &theirs)]).await),
        json!([]),
        "a scope in another org's project"
    );
    assert_eq!(
        access(
            keyplane
                .token(
                    &ci,
                    &[("scope", &theirs), ("scope", &format!("{app}:pull"))]
                )
                .await
        ),
        json!([{"type": "repository", "name": format!("{project}/app"), "actions": ["pull"]}]),
        "one scope of another org's project and one of its own"
    );
    assert_eq!(
        access(
            keyplane
                .token(
                    &other.default_robot,
                    &[("scope", &format!("{app}:pull,push"))]
                )
                .await
        ),
        json!([]),
        "another org's robot asking for this org's repository"
    );
    // `docker login` asks with no scope at all: a valid token with empty access.
    assert_eq!(access(keyplane.token(&ci, &[]).await), json!([]));

    // Refusals, in the registry's error format.
    let wrong = Robot {
        secret: reader.secret.clone(),
        ..ci.clone()
    };
    let refused = keyplane
        .token_request(&wrong, &[("scope", &format!("{app}:pull"))])
        .await;
    let challenge = refused
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        challenge.starts_with("basic "),
        "a refused login should challenge for Basic, got {challenge:?}"
    );
    assert_unauthorized(refused, "GET with another robot's secret").await;
    let anonymous = keyplane
        .http
        .get(keyplane.url("/registry/token"))
        .query(&[("service", SERVICE), ("scope", &format!("{app}:pull"))])
        .send()
        .await
        .expect("GET /registry/token");
    assert_unauthorized(anonymous, "GET without credentials").await;
    let wrong_service = keyplane
        .token_request(&ci, &[("service", "some-other-registry")])
        .await;
    let status = wrong_service.status();
    let body = wrong_service.text().await.unwrap_or_default();
    assert!(
        status.is_client_error() && !body.contains("\"token\""),
        "a token for another service was issued: {status} {body}"
    );

    // The OAuth2 password form the docker CLI posts.
    let form = |password: &str| {
        vec![
            ("grant_type", "password".to_string()),
            ("username", ci.username()),
            ("password", password.to_string()),
            ("service", SERVICE.to_string()),
            ("scope", format!("{app}:pull")),
            ("client_id", "keyplane-interop".to_string()),
            ("access_type", "offline".to_string()),
        ]
    };
    let posted = keyplane
        .http
        .post(keyplane.url("/registry/token"))
        .form(&form(&ci.secret))
        .send()
        .await
        .expect("POST /registry/token");
    let answer = TokenAnswer::read(posted, "the OAuth2 password form").await;
    assert_eq!(
        answer.claims["access"],
        json!([{"type": "repository", "name": format!("{project}/app"), "actions": ["pull"]}]),
        "access of the OAuth2 form's token"
    );
    assert_eq!(answer.claims["aud"], json!(SERVICE));
    let posted = keyplane
        .http
        .post(keyplane.url("/registry/token"))
        .form(&form(&reader.secret))
        .send()
        .await
        .expect("POST /registry/token");
    assert_unauthorized(posted, "the OAuth2 form with a wrong password").await;
}

/// `admin registry-key stage`, then `promote` while `serve` runs and a registry trusts the staged
/// bundle: pushes work throughout without a restart of either, tokens switch to the new key within
/// the refresh interval, and a registry that trusts only the old key refuses them.
async fn the_signing_key_rotates_without_downtime(backend: Backend) {
    require_peer_tools();
    let (store, work, registry_addr, keyplane) = token_server(backend).await;
    let work = work.path();
    let org = store.bootstrap_org();
    let project = keyplane.enable_registry(&org).await.project;
    let ci = keyplane
        .create_robot(&org, &project, "ci", Some(&["pull", "push"]))
        .await;
    let image = build_image(work).await;
    let token = || keyplane.token(&ci, &[]);

    let old_cert = registry_cert(&store).await;
    assert_eq!(certificates(&old_cert).len(), 1, "{old_cert}");
    let new_kid = registry_key(&store, &["stage"]).await;
    assert_eq!(
        registry_key(&store, &["stage"]).await,
        new_kid,
        "a second stage keeps the staged key"
    );
    let bundle = registry_cert(&store).await;
    let staged = certificates(&bundle);
    assert_eq!(staged.len(), 2, "current and next:\n{bundle}");
    assert_eq!(staged[0], old_cert, "the current certificate comes first");
    let new_cert = staged[1].clone();
    let shown = registry_keys_shown(&store).await;
    assert_eq!(shown["next"]["key_id"], new_kid.as_str(), "{shown}");
    // Still signed with the current key.
    token().await.assert_signed_by(&old_cert);

    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir).expect("create the registry's directory");
    let registry = Registry::start(&registry_dir, &registry_addr, &keyplane.addr, &bundle).await;
    let skopeo = Skopeo::new(work, &registry_addr);
    let stack = Stack {
        keyplane: &keyplane,
        registry: &registry,
    };
    stack.ok(
        skopeo
            .push(&image, &format!("{project}/app:before"), Some(&ci))
            .await,
        "a push before the promotion",
    );

    assert_eq!(registry_key(&store, &["promote"]).await, new_kid);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = token().await;
        if answer.header["kid"] == new_kid.as_str() {
            answer.assert_signed_by(&new_cert);
            break;
        }
        answer.assert_signed_by(&old_cert);
        assert!(
            Instant::now() < deadline,
            "serve still signs with the old key 10 s after the promotion (refresh every 1 s)\n{}",
            stack.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = keyplane.log();
    assert!(
        log.lines()
            .any(|line| line.contains("registry signing key promoted") && line.contains(&new_kid)),
        "serve must log the promotion it picked up, with the key id:\n{log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "serve logged a private key");
    stack.ok(
        skopeo
            .push(&image, &format!("{project}/app:after"), Some(&ci))
            .await,
        "a push after the promotion, the registry not restarted",
    );
    let bundle = registry_cert(&store).await;
    assert_eq!(
        certificates(&bundle),
        [new_cert.clone(), old_cert.clone()],
        "current, then previous"
    );

    let refused = run(common::keyplane()
        .args(["admin", "registry-key", "retire-previous"])
        .args(store.args()))
    .await;
    assert!(
        !refused.status.success() && refused.stderr.contains("--force"),
        "retire-previous right after the promotion must be refused, naming --force: {}",
        refused.describe()
    );
    assert_eq!(certificates(&registry_cert(&store).await).len(), 2);
    let old_kid = registry_keys_shown(&store).await["previous"]["key_id"]
        .as_str()
        .expect("the previous key's id")
        .to_owned();
    assert_eq!(
        registry_key(&store, &["retire-previous", "--force"]).await,
        old_kid
    );
    assert_eq!(
        certificates(&registry_cert(&store).await),
        [new_cert],
        "the current certificate alone once the previous key is retired"
    );

    // A registry that trusts only the old certificate refuses the new tokens.
    let stale_dir = work.join("stale-registry");
    std::fs::create_dir_all(&stale_dir).expect("create the stale registry's directory");
    let stale_addr = format!("127.0.0.1:{}", free_loopback_port());
    let stale = Registry::start(&stale_dir, &stale_addr, &keyplane.addr, &old_cert).await;
    let stale_stack = Stack {
        keyplane: &keyplane,
        registry: &stale,
    };
    stale_stack.refused(
        Skopeo::new(work, &stale_addr)
            .push(&image, &format!("{project}/app:stale"), Some(&ci))
            .await,
        "a push to a registry that trusts only the retired key",
    );
}

/// `keyplane admin registry-key ARGS`, which must succeed; its stdout (a key id).
async fn registry_key(store: &TestStore, args: &[&str]) -> String {
    let out = run(keyplane()
        .args(["admin", "registry-key"])
        .args(args)
        .args(store.args()))
    .await;
    assert!(
        out.status.success(),
        "admin registry-key {args:?}: {}",
        out.describe()
    );
    assert!(!out.stdout.contains("PRIVATE KEY") && !out.stderr.contains("PRIVATE KEY"));
    out.stdout.trim().to_owned()
}

/// `keyplane admin registry-key show --json`.
async fn registry_keys_shown(store: &TestStore) -> Value {
    let shown = registry_key(store, &["show", "--json"]).await;
    serde_json::from_str(&shown)
        .unwrap_or_else(|e| panic!("show --json is not JSON ({e}): {shown}"))
}

/// The certificate blocks of a PEM bundle, each with its own lines.
fn certificates(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter(|block| block.contains(END))
        .map(|block| format!("{}\n", block.trim_start()))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The peers

/// A fresh store, a work directory, the address the registry is to listen on, and keyplane as its
/// token server: keyplane first (the registry's realm is its address), on a registry port picked
/// beforehand so that the Registry record's `endpoint` is the real one.
async fn token_server(backend: Backend) -> (TestStore, tempfile::TempDir, String, Keyplane) {
    let store = TestStore::new(backend).await;
    let work = tempfile::Builder::new()
        .prefix("keyplane-interop-")
        .tempdir()
        .expect("create a work directory");
    let registry_addr = format!("127.0.0.1:{}", free_loopback_port());
    let keyplane = Keyplane::start_as_token_server(&store, &registry_addr).await;
    (store, work, registry_addr, keyplane)
}

/// Fails, never skips, when a peer tool is missing.
fn require_peer_tools() {
    for (path, package) in [(REGISTRY_BIN, "docker-registry"), (SKOPEO_BIN, "skopeo")] {
        assert!(
            Path::new(path).is_file(),
            "{path} is missing: the registry interop tests need the Debian package `{package}` \
             (CNCF Distribution 2.8 and skopeo 1.9). Install both with: {INSTALL}"
        );
    }
}

/// `docker-registry serve` with token auth pointing at keyplane, as in the recipe.
struct Registry {
    process: KillOnDrop,
    log: PathBuf,
}

impl Registry {
    async fn start(work: &Path, addr: &str, keyplane_addr: &str, cert_pem: &str) -> Self {
        let bundle = work.join("bundle.pem");
        std::fs::write(&bundle, cert_pem).expect("write the rootcertbundle");
        let data = work.join("registry-data");
        std::fs::create_dir_all(&data).expect("create the registry's storage directory");
        let config = work.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n\
                 storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: keyplane-interop-not-secret\n\
                 auth:\n  token:\n    realm: http://{keyplane_addr}/registry/token\n    \
                 service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {bundle}\n",
                data = data.display(),
                bundle = bundle.display(),
            ),
        )
        .expect("write registry.yml");
        let log = work.join("registry.log");
        let log_file = File::create(&log).expect("create registry.log");
        let mut command = Command::new(REGISTRY_BIN);
        command
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone a file handle"))
            .stderr(log_file);
        // `REGISTRY_*` variables override the config file.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(key);
            }
        }
        let process = KillOnDrop(command.spawn().expect("spawn docker-registry serve"));
        let mut registry = Self { process, log };

        let http = http_client(TIMEOUT);
        let url = format!("http://{addr}/v2/");
        let deadline = Instant::now() + TIMEOUT;
        let challenge = loop {
            if let Some(status) = registry.process.0.try_wait().expect("poll docker-registry") {
                panic!(
                    "docker-registry exited ({status}) before answering:\n{}",
                    registry.log_tail()
                );
            }
            if let Ok(response) = http.get(&url).send().await {
                assert_eq!(
                    response.status(),
                    StatusCode::UNAUTHORIZED,
                    "GET /v2/ without a token must answer 401 with token auth on:\n{}",
                    registry.log_tail()
                );
                break response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {addr} within {TIMEOUT:?}:\n{}",
                registry.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let realm = format!("realm=\"http://{keyplane_addr}/registry/token\"");
        assert!(
            challenge.contains(&realm) && challenge.contains(&format!("service=\"{SERVICE}\"")),
            "the registry's challenge does not name keyplane's realm: {challenge}"
        );
        registry
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
    }
}

/// What failure messages show of both servers.
struct Stack<'a> {
    keyplane: &'a Keyplane,
    registry: &'a Registry,
}

impl Stack<'_> {
    fn diagnostics(&self) -> String {
        format!(
            "--- keyplane log (tail) ---\n{}\n--- registry log (tail) ---\n{}",
            tail(&self.keyplane.log(), 20),
            self.registry.log_tail()
        )
    }

    /// Asserts that a skopeo step worked; returns its stdout.
    #[track_caller]
    fn ok(&self, out: CommandOutput, what: impl std::fmt::Display) -> String {
        assert!(
            out.status.success(),
            "{what}: expected success, got {}\n{}",
            out.describe(),
            self.diagnostics()
        );
        out.stdout
    }

    /// Asserts that a skopeo step was refused for want of authorization (not for some other
    /// reason, like a registry that is down).
    #[track_caller]
    fn refused(&self, out: CommandOutput, what: impl std::fmt::Display) {
        let stderr = out.stderr.to_ascii_lowercase();
        assert!(
            !out.status.success() && (stderr.contains("unauthorized") || stderr.contains("denied")),
            "{what}: expected an authorization refusal, got {}\n{}",
            out.describe(),
            self.diagnostics()
        );
    }

    /// Asserts that an authorized read found no such image.
    #[track_caller]
    fn absent(&self, out: CommandOutput, what: impl std::fmt::Display) {
        let stderr = out.stderr.to_ascii_lowercase();
        assert!(
            !out.status.success()
                && (stderr.contains("manifest unknown") || stderr.contains("name unknown")),
            "{what}: expected `manifest unknown`, got {}\n{}",
            out.describe(),
            self.diagnostics()
        );
    }
}

/// skopeo against the registry over plain HTTP, with no signature policy file or auth file of the
/// machine involved.
struct Skopeo {
    registry: String,
    auth_file: PathBuf,
}

impl Skopeo {
    fn new(work: &Path, registry: &str) -> Self {
        Self {
            registry: registry.to_owned(),
            auth_file: work.join("no-auth.json"),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(SKOPEO_BIN);
        command
            .env("REGISTRY_AUTH_FILE", &self.auth_file)
            .arg("--insecure-policy");
        command
    }

    fn docker(&self, reference: &str) -> String {
        format!("docker://{}/{reference}", self.registry)
    }

    async fn push(&self, image: &Path, reference: &str, robot: Option<&Robot>) -> CommandOutput {
        let mut command = self.command();
        command
            .args(["copy", "--dest-tls-verify=false"])
            .args(creds("--dest-creds", "--dest-no-creds", robot))
            .arg(oci(image))
            .arg(self.docker(reference));
        run(&mut command).await
    }

    async fn pull(&self, reference: &str, into: &Path, robot: &Robot) -> CommandOutput {
        let mut command = self.command();
        command
            .args(["copy", "--src-tls-verify=false"])
            .args(creds("--src-creds", "--src-no-creds", Some(robot)))
            .arg(self.docker(reference))
            .arg(oci(into));
        run(&mut command).await
    }

    /// `inspect --format {{.Digest}}`: reads the manifest and the config blob, so it needs `pull`.
    async fn inspect(&self, reference: &str, robot: Option<&Robot>) -> CommandOutput {
        let mut command = self.command();
        command
            .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
            .args(creds("--creds", "--no-creds", robot))
            .arg(self.docker(reference));
        run(&mut command).await
    }

    async fn delete(&self, reference: &str, robot: &Robot) -> CommandOutput {
        let mut command = self.command();
        command
            .args(["delete", "--tls-verify=false"])
            .args(creds("--creds", "--no-creds", Some(robot)))
            .arg(self.docker(reference));
        run(&mut command).await
    }

    /// The manifest digest of a local OCI layout's `v1`.
    async fn oci_digest(&self, layout: &Path) -> String {
        let mut command = self.command();
        command
            .args(["inspect", "--format", "{{.Digest}}"])
            .arg(oci(layout));
        let out = run(&mut command).await;
        assert!(
            out.status.success(),
            "skopeo inspect of {}: {}",
            layout.display(),
            out.describe()
        );
        let digest = out.stdout.trim().to_owned();
        assert!(digest.starts_with("sha256:"), "not a digest: {digest:?}");
        digest
    }
}

fn oci(layout: &Path) -> String {
    format!("oci:{}:v1", layout.display())
}

fn creds(flag: &str, none: &str, robot: Option<&Robot>) -> Vec<String> {
    match robot {
        Some(robot) => vec![flag.to_owned(), robot.creds()],
        None => vec![none.to_owned()],
    }
}

/// The recipe's `mkimage.sh`: a one-layer OCI image layout `img` (tag `v1`) built by hand with tar,
/// gzip and sha256sum, so no network and no daemon are needed.
const MKIMAGE: &str = r#"set -eu
rm -rf img rootfs && mkdir -p img/blobs/sha256 rootfs
echo "hello from keyplane interop" > rootfs/hello.txt
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C rootfs -cf layer.tar hello.txt
DIFF=$(sha256sum layer.tar | cut -d' ' -f1)
gzip -n -9 -c layer.tar > layer.tar.gz
LAYER=$(sha256sum layer.tar.gz | cut -d' ' -f1); LSIZE=$(stat -c %s layer.tar.gz)
mv layer.tar.gz img/blobs/sha256/$LAYER; rm layer.tar
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/hello"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$DIFF" > cfg.json
CFG=$(sha256sum cfg.json | cut -d' ' -f1); CSIZE=$(stat -c %s cfg.json); mv cfg.json img/blobs/sha256/$CFG
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' "$CFG" "$CSIZE" "$LAYER" "$LSIZE" > man.json
MAN=$(sha256sum man.json | cut -d' ' -f1); MSIZE=$(stat -c %s man.json); mv man.json img/blobs/sha256/$MAN
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' "$MAN" "$MSIZE" > img/index.json
printf '{"imageLayoutVersion":"1.0.0"}' > img/oci-layout
rm -rf rootfs
"#;

async fn build_image(work: &Path) -> PathBuf {
    let out = run(Command::new("sh").args(["-c", MKIMAGE]).current_dir(work)).await;
    assert!(
        out.status.success(),
        "building the image: {}",
        out.describe()
    );
    work.join("img")
}

// ------------------------------------------------------------------------------------------------
// keyplane

impl TestStore {
    /// `keyplane admin create-org --name NAME --json`.
    async fn create_org(&self, name: &str) -> Org {
        let out = run(keyplane()
            .args(["admin", "create-org", "--name", name, "--json"])
            .args(self.args()))
        .await;
        assert!(out.status.success(), "admin create-org: {}", out.describe());
        Org::from_json(&out.stdout)
    }
}

/// `keyplane admin registry-cert`: the PEM for the registry's `rootcertbundle`.
async fn registry_cert(store: &TestStore) -> String {
    let out = run(keyplane()
        .args(["admin", "registry-cert"])
        .args(store.args()))
    .await;
    assert!(
        out.status.success(),
        "admin registry-cert: {}",
        out.describe()
    );
    assert!(
        out.stdout.starts_with("-----BEGIN CERTIFICATE-----")
            && out.stdout.trim_end().ends_with("-----END CERTIFICATE-----")
            && !out.stdout.contains("PRIVATE KEY"),
        "admin registry-cert must print certificate blocks only:\n{}",
        out.stdout
    );
    out.stdout
}

/// A robot account and its current secret.
#[derive(Clone)]
struct Robot {
    id: String,
    project: String,
    name: String,
    secret: String,
}

impl Robot {
    fn username(&self) -> String {
        format!("robot${}+{}", self.project, self.name)
    }

    /// skopeo's `USER:PASSWORD`.
    fn creds(&self) -> String {
        format!("{}:{}", self.username(), self.secret)
    }
}

/// `POST /registry`'s answer.
struct Enabled {
    project: String,
    endpoint: String,
    default_robot: Robot,
}

/// A `200` from the token endpoint, checked for the fields clients read, with the JWT decoded.
struct TokenAnswer {
    token: String,
    expires_in: i64,
    issued_at: DateTime<Utc>,
    header: Value,
    claims: Value,
}

impl TokenAnswer {
    async fn read(response: reqwest::Response, what: &str) -> Self {
        let status = response.status();
        let body = response.text().await.expect("read the token answer");
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
        let body: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
        let token = body["token"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no `token` (what skopeo reads) in {body}"));
        assert_eq!(
            body["access_token"].as_str(),
            Some(token),
            "{what}: `access_token` (what OAuth2 clients read) must be the same JWT"
        );
        let expires_in = body["expires_in"]
            .as_i64()
            .unwrap_or_else(|| panic!("{what}: no integer `expires_in` in {body}"));
        assert!(
            expires_in >= 60,
            "{what}: expires_in {expires_in} is below the spec's minimum of 60"
        );
        let issued_at = body["issued_at"]
            .as_str()
            .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            .unwrap_or_else(|| panic!("{what}: `issued_at` is not RFC 3339 in {body}"))
            .to_utc();

        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{what}: not a compact JWS: {token}");
        let header = jwt_json(parts[0]);
        assert_eq!(
            header["alg"], "ES256",
            "{what}: the registry takes ES256 for a P-256 key: {header}"
        );
        let kid = header["kid"].as_str().unwrap_or_default();
        assert!(
            kid.len() == 59
                && kid.split(':').count() == 12
                && kid.split(':').all(|group| group.len() == 4
                    && group
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))),
            "{what}: kid must be a libtrust key id (12 groups of 4 base32 characters): {header}"
        );
        Self {
            token: token.to_owned(),
            expires_in,
            issued_at,
            header,
            claims: jwt_json(parts[1]),
        }
    }

    /// Asserts what a registry trusting `cert_pem` (one certificate) checks: the header's `x5c` is
    /// that certificate alone, `kid` is the libtrust id of its key, and the signature verifies
    /// with its key.
    #[track_caller]
    fn assert_signed_by(&self, cert_pem: &str) {
        let der = certificate_der(cert_pem);
        let x5c: Vec<Vec<u8>> = self.header["x5c"]
            .as_array()
            .unwrap_or_else(|| panic!("no `x5c` array in the JWT header: {}", self.header))
            .iter()
            .map(|cert| {
                data_encoding::BASE64
                    .decode(cert.as_str().unwrap_or_default().as_bytes())
                    .unwrap_or_else(|e| panic!("x5c entry is not standard base64 ({e}): {cert}"))
            })
            .collect();
        assert!(
            x5c == [der.clone()],
            "x5c must be exactly the signing certificate:\n{cert_pem}\nheader: {}",
            self.header
        );
        assert_eq!(
            self.header["kid"].as_str(),
            Some(keyplane_core::registry::libtrust_key_id(p256_spki(&der)).as_str()),
            "kid must be the libtrust id of the certificate's key"
        );
        let key = jsonwebtoken::DecodingKey::from_ec_pem(cert_pem.as_bytes())
            .expect("the certificate's public key");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&[SERVICE]);
        validation.set_issuer(&[ISSUER]);
        if let Err(e) = jsonwebtoken::decode::<Value>(&self.token, &key, &validation) {
            panic!("the token does not verify with the certificate's key ({e}):\n{cert_pem}");
        }
    }
}

/// The DER of one PEM certificate.
fn certificate_der(cert_pem: &str) -> Vec<u8> {
    let body: String = cert_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    data_encoding::BASE64
        .decode(body.trim().as_bytes())
        .unwrap_or_else(|e| panic!("not a PEM certificate ({e}):\n{cert_pem}"))
}

/// The P-256 SubjectPublicKeyInfo inside a certificate's DER: its fixed 26-byte prefix (SEQUENCE,
/// id-ecPublicKey, prime256v1, BIT STRING) and the 65-byte uncompressed point.
fn p256_spki(der: &[u8]) -> &[u8] {
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let start = der
        .windows(PREFIX.len())
        .position(|window| window == PREFIX)
        .expect("the certificate holds a P-256 public key");
    &der[start..start + 91]
}

fn jwt_json(part: &str) -> Value {
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(part.as_bytes())
        .unwrap_or_else(|e| panic!("JWT part is not unpadded base64url ({e}): {part}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JWT part is not JSON ({e})"))
}

async fn assert_unauthorized(response: reqwest::Response, what: &str) {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    let body: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    assert_eq!(
        body["errors"][0]["code"], "UNAUTHORIZED",
        "{what}: the registry error format: {body}"
    );
    assert!(body["errors"][0]["message"].is_string(), "{what}: {body}");
    assert!(
        !body.to_string().contains("token\""),
        "{what}: a refusal carries a token: {body}"
    );
}

impl Keyplane {
    /// `keyplane serve` as the token server of the registry at `registry_endpoint`, recording use
    /// every 100 ms.
    async fn start_as_token_server(store: &TestStore, registry_endpoint: &str) -> Self {
        let args = [
            "--last-used-flush-ms",
            "100",
            "--registry-service",
            SERVICE,
            "--registry-issuer",
            ISSUER,
            "--registry-endpoint",
            registry_endpoint,
            // A promotion reaches it within a second (the rotation test).
            "--registry-key-refresh-seconds",
            "1",
        ];
        Self::start(store, &args, TIMEOUT).await
    }

    fn org_url(&self, org: &Org, rest: &str) -> String {
        self.url(&format!("/api/v1/organizations/{}{rest}", org.id))
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> (StatusCode, Value) {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
        };
        (status, body)
    }

    async fn enable_registry(&self, org: &Org) -> Enabled {
        let (status, body) = self
            .send(
                self.http
                    .post(self.org_url(org, "/registry"))
                    .bearer_auth(&org.token),
                "POST /registry",
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "POST /registry: {body}");
        let project = string_field(&body["registry"], "harbor_project");
        let username = string_field(&body["credentials"], "username");
        let prefix = format!("robot${project}+");
        let name = username
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("credentials.username {username:?} is not {prefix}<name>"))
            .to_owned();
        Enabled {
            endpoint: string_field(&body["registry"], "endpoint"),
            default_robot: Robot {
                id: String::new(),
                project: project.clone(),
                name,
                secret: string_field(&body["credentials"], "password"),
            },
            project,
        }
    }

    async fn create_robot(
        &self,
        org: &Org,
        project: &str,
        name: &str,
        permissions: Option<&[&str]>,
    ) -> Robot {
        let body = match permissions {
            Some(permissions) => json!({ "name": name, "permissions": permissions }),
            None => json!({ "name": name }),
        };
        let (status, created) = self
            .send(
                self.http
                    .post(self.org_url(org, "/registry/robot-accounts"))
                    .bearer_auth(&org.token)
                    .json(&body),
                "POST robot-accounts",
            )
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "creating robot {name}: {created}"
        );
        let expected = permissions.unwrap_or(&["pull"]);
        assert_eq!(created["permissions"], json!(expected), "{created}");
        Robot {
            id: string_field(&created, "id"),
            project: project.to_owned(),
            name: name.to_owned(),
            secret: string_field(&created, "token"),
        }
    }

    async fn get_robot(&self, org: &Org, robot: &Robot) -> Value {
        let (status, body) = self
            .send(
                self.http
                    .get(self.org_url(org, &format!("/registry/robot-accounts/{}", robot.id)))
                    .bearer_auth(&org.token),
                "GET robot-account",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "GET robot {}: {body}", robot.name);
        body
    }

    async fn delete_robot(&self, org: &Org, robot: &Robot) -> StatusCode {
        self.send(
            self.http
                .delete(self.org_url(org, &format!("/registry/robot-accounts/{}", robot.id)))
                .bearer_auth(&org.token),
            "DELETE robot-account",
        )
        .await
        .0
    }

    /// Rotates with `body` (`None`: no body at all, the old secret stops at once).
    async fn rotate_robot(&self, org: &Org, robot: &Robot, body: Option<Value>) -> Robot {
        let request = self
            .http
            .post(self.org_url(
                org,
                &format!("/registry/robot-accounts/{}/rotate", robot.id),
            ))
            .bearer_auth(&org.token);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let (status, body) = self.send(request, "POST rotate").await;
        assert_eq!(status, StatusCode::OK, "rotating {}: {body}", robot.name);
        assert_eq!(body["id"], robot.id.as_str(), "rotation changed the id");
        Robot {
            secret: string_field(&body, "token"),
            ..robot.clone()
        }
    }

    /// Polls (bounded) until the robot's `last_used_at` is set.
    async fn wait_for_last_used(&self, org: &Org, robot: &Robot) -> DateTime<Utc> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let view = self.get_robot(org, robot).await;
            if let Some(at) = view["last_used_at"].as_str() {
                return DateTime::parse_from_rfc3339(at)
                    .unwrap_or_else(|e| panic!("last_used_at {at:?} is not RFC 3339: {e}"))
                    .to_utc();
            }
            assert!(
                Instant::now() < deadline,
                "last_used_at of {} was not recorded within {TIMEOUT:?}: {view}",
                robot.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn token_request(&self, robot: &Robot, params: &[(&str, &str)]) -> reqwest::Response {
        let mut query = vec![("account", robot.username())];
        if !params.iter().any(|(key, _)| *key == "service") {
            query.push(("service", SERVICE.to_owned()));
        }
        query.extend(params.iter().map(|(k, v)| (*k, (*v).to_owned())));
        self.http
            .get(self.url("/registry/token"))
            .basic_auth(robot.username(), Some(&robot.secret))
            .query(&query)
            .send()
            .await
            .expect("GET /registry/token")
    }

    /// `GET /registry/token` as skopeo sends it, which must succeed.
    async fn token(&self, robot: &Robot, params: &[(&str, &str)]) -> TokenAnswer {
        let response = self.token_request(robot, params).await;
        TokenAnswer::read(
            response,
            &format!("GET /registry/token as {} with {params:?}", robot.name),
        )
        .await
    }
}

// ------------------------------------------------------------------------------------------------
// Processes

/// Runs a command to completion within [`TIMEOUT`], as [`common::run`] does.
async fn run(command: &mut Command) -> CommandOutput {
    common::run(command, TIMEOUT).await
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
