//! `keyplane-bench`: the load tools `bench/run.sh` drives against running servers on loopback.
//! Every loop is bounded in count and time.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt};
use keyplane_bench::{percentile, seed_api_tokens};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import COUNT live API tokens into a store (one new org) and write them, one per line.
    Seed {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        tokens_out: std::path::PathBuf,
    },
    /// Create COUNT API tokens through the HTTP API, CONCURRENCY at a time.
    Create {
        #[arg(long)]
        base: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Forward-auth each of the first COUNT tokens in FILE once: on a fresh server, every one is a
    /// cache miss that reads the store.
    ColdVerify {
        #[arg(long)]
        base: String,
        #[arg(long)]
        tokens: std::path::PathBuf,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Revoke through one replica and time how long until the others reject the token.
    Propagation {
        /// Comma-separated base URLs; the first one revokes.
        #[arg(long)]
        bases: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 200)]
        rounds: usize,
    },
    /// Hold CONNECTIONS slow connections (half trickle a request head a byte at a time, half send
    /// nothing; closed ones are reopened) for SECONDS, meanwhile timing `/healthz` and forward-auth
    /// with TOKEN; reports their latency, how many slow connections the server closed, and the
    /// server's RSS (VmRSS of PID).
    SlowClients {
        #[arg(long)]
        base: String,
        #[arg(long)]
        token: String,
        /// The keyplane process, for its RSS.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Cache isolation: one org's VICTIMS tokens are cached, another org introspects FLOOD random
    /// well-formed tokens (right prefix and checksum, unknown hash); prints the victims' cache hit
    /// ratio before and after. Runs its own server (default settings, limits off so every flood
    /// request reaches the cache) on 127.0.0.1.
    CacheFlood {
        /// The store; default: a fresh SQLite database in a temporary directory.
        #[arg(long)]
        database_url: Option<String>,
        #[arg(long, default_value_t = 2000)]
        victims: usize,
        #[arg(long, default_value_t = 120_000)]
        flood: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// keyplane-verifier in-process on ONE current-thread runtime (the verifier, its revocation
    /// stream and the load share one thread): warms its cache with TAKE tokens, then verifies them
    /// round-robin for SECONDS (at most COUNT verifies); prints verifies/s and latency as JSON.
    /// With THREADS > 1, that many threads verify at once through the same verifier (each from
    /// its own place in the list), while the runtime's thread keeps the stream.
    EmbeddedVerify {
        #[arg(long)]
        base: String,
        /// A credential holding `tokens:verify`.
        #[arg(long)]
        verify_token: String,
        /// Subject tokens, one per line (e.g. `seed --tokens-out`); without it, TAKE tokens are
        /// created through the API with --org and --org-token.
        #[arg(long)]
        tokens: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 10_000)]
        take: usize,
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        org_token: Option<String>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100_000_000)]
        count: u64,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
        threads: u32,
    },
    /// Revocation to refusal through keyplane-verifier: ROUNDS times, create a token, verify it
    /// (then cached), revoke it through REVOKE_BASE (default: BASE) and poll `verify` until it is
    /// refused; the verifier follows BASE's revocation stream. Prints, from the revoke call's
    /// return, when the verifier applied the event and when it refused, as JSON.
    VerifierRevocation {
        /// The replica the verifier introspects and follows.
        #[arg(long)]
        base: String,
        /// The replica tokens are created and revoked through.
        #[arg(long)]
        revoke_base: Option<String>,
        #[arg(long)]
        org: String,
        /// A credential of ORG that may create and revoke API tokens.
        #[arg(long)]
        token: String,
        /// A credential holding `tokens:verify`; default: one created through BASE.
        #[arg(long)]
        verify_token: Option<String>,
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        /// How long one round may wait for the refusal.
        #[arg(long, default_value_t = 10)]
        round_timeout_seconds: u64,
    },
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(64)
        .build()
        .expect("an HTTP client")
}

fn report(what: &str, mut samples: Vec<Duration>, elapsed: Duration) {
    samples.sort();
    let n = samples.len();
    println!(
        "{what}: n={n} elapsed={:.2}s rate={:.0}/s p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        percentile(&samples, 50.0).as_secs_f64() * 1e3,
        percentile(&samples, 90.0).as_secs_f64() * 1e3,
        percentile(&samples, 99.0).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

async fn seed(
    database_url: &str,
    count: usize,
    tokens_out: &std::path::Path,
) -> anyhow::Result<()> {
    let store = keyplane_store::connect(database_url).await?;
    let org =
        keyplane_server::ops::create_org(store.as_ref(), "bench", &keyplane_bench::operator())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let (secrets, in_store) = seed_api_tokens(store.as_ref(), org.tenant.id, count).await?;
    let elapsed = started.elapsed();
    let mut out = std::io::BufWriter::new(std::fs::File::create(tokens_out)?);
    for secret in &secrets {
        writeln!(out, "{}", secret.expose_secret())?;
    }
    out.flush()?;
    println!(
        "{}",
        json!({"org_id": org.tenant.id.to_string(), "token": org.token.secret.expose_secret(),
               "imported": count, "import_seconds": elapsed.as_secs_f64(),
               "store_seconds": in_store.as_secs_f64(),
               "mint_seconds": (elapsed - in_store).as_secs_f64()})
    );
    Ok(())
}

async fn create(
    base: &str,
    org: &str,
    token: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = client();
    let url = format!("{base}/api/v1/organizations/{org}/api-tokens");
    let run = format!("{:x}", rand::random::<u32>());
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = stream::iter(0..count)
        .map(|i| {
            let (client, url, run) = (&client, &url, &run);
            async move {
                let sent = Instant::now();
                let res = client
                    .post(url)
                    .bearer_auth(token)
                    .json(&json!({"name": format!("create-{run}-{i}"), "scopes": ["deploy"]}))
                    .send()
                    .await?;
                if res.status() != 201 {
                    bail!("create answered {}", res.status());
                }
                Ok(sent.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let samples = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    report("create", samples, started.elapsed());
    Ok(())
}

async fn cold_verify(
    base: &str,
    tokens: &std::path::Path,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(tokens).context("reading the tokens file")?;
    let tokens: Vec<&str> = text.lines().take(count).collect();
    let client = client();
    let url = format!("{base}/v1/auth/forward");
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = stream::iter(tokens)
        .map(|token| {
            let (client, url) = (&client, &url);
            async move {
                let sent = Instant::now();
                let res = client.get(url).bearer_auth(token).send().await?;
                if res.status() != 200 {
                    bail!("forward-auth answered {}", res.status());
                }
                Ok(sent.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let samples = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    report("cold-verify (cache misses)", samples, started.elapsed());
    Ok(())
}

/// Polls `base` with `token` until it is rejected; the time from `since`.
async fn until_rejected(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    since: Instant,
) -> anyhow::Result<Duration> {
    let url = format!("{base}/v1/auth/forward");
    let deadline = since + Duration::from_secs(60);
    loop {
        let status = client.get(&url).bearer_auth(token).send().await?.status();
        if status == 401 {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("{base} still accepted a revoked token after 60 s");
        }
    }
}

async fn propagation(bases: &str, org: &str, token: &str, rounds: usize) -> anyhow::Result<()> {
    let bases: Vec<&str> = bases.split(',').collect();
    if bases.len() < 2 {
        bail!("give at least two replicas");
    }
    let client = client();
    let tokens_url = format!("{}/api/v1/organizations/{org}/api-tokens", bases[0]);
    let mut samples = Vec::with_capacity(rounds * (bases.len() - 1));
    let started = Instant::now();
    for round in 0..rounds {
        let name = format!("propagation-{round}-{:x}", rand::random::<u32>());
        let (id, secret) = create_token(&client, &tokens_url, token, &name).await?;
        let (id, secret) = (id.as_str(), secret.as_str());
        for base in &bases[1..] {
            let status = client
                .get(format!("{base}/v1/auth/forward"))
                .bearer_auth(secret)
                .send()
                .await?
                .status();
            if status != 200 {
                bail!("{base} did not accept a fresh token: {status}");
            }
        }
        let revoked_at = revoke_token(&client, &tokens_url, token, id).await?;
        let waits = futures::future::try_join_all(
            bases[1..]
                .iter()
                .map(|base| until_rejected(&client, base, secret, revoked_at)),
        )
        .await?;
        samples.extend(waits);
    }
    report(
        "revocation visible on the other replicas",
        samples,
        started.elapsed(),
    );
    Ok(())
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

const SLOW_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: keyplane\r\nx-slow: ";

/// One slow connection: how far into its head it is (`None`: it sends nothing).
struct Slow {
    stream: tokio::net::TcpStream,
    sent: Option<usize>,
}

impl Slow {
    async fn open(addr: &str, trickles: bool) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        Ok(Self {
            stream,
            sent: trickles.then_some(0),
        })
    }

    /// One more byte, if it trickles; `false` once the server has closed it.
    fn step(&mut self) -> bool {
        let mut probe = [0u8; 64];
        match self.stream.try_read(&mut probe) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
        if let Some(sent) = &mut self.sent {
            let byte = SLOW_HEAD[*sent % SLOW_HEAD.len()];
            match self.stream.try_write(&[byte]) {
                Ok(_) => *sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
        true
    }
}

async fn slow_clients(
    base: &str,
    token: &str,
    pid: Option<u32>,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let addr = base
        .strip_prefix("http://")
        .context("--base must be http://HOST:PORT")?
        .trim_end_matches('/')
        .to_string();
    let client = client();
    let (health_url, forward_url) = (format!("{base}/healthz"), format!("{base}/v1/auth/forward"));
    let rss_before = rss_kib(pid);
    let mut held = Vec::with_capacity(connections);
    for n in 0..connections {
        held.push(Slow::open(&addr, n % 2 == 0).await?);
    }
    let (mut health, mut forward) = (Vec::new(), Vec::new());
    let (mut closed_by_server, mut rss_peak) = (0usize, rss_before.unwrap_or(0));
    let started = Instant::now();
    let mut last_step = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        if last_step.elapsed() >= Duration::from_millis(500) {
            last_step = Instant::now();
            for slow in held.iter_mut() {
                if !slow.step() {
                    closed_by_server += 1;
                    let trickles = slow.sent.is_some();
                    *slow = Slow::open(&addr, trickles).await?;
                }
            }
            rss_peak = rss_peak.max(rss_kib(pid).unwrap_or(0));
        }
        let sent = Instant::now();
        let res = client.get(&health_url).send().await?;
        if res.status() != 200 {
            bail!("/healthz answered {}", res.status());
        }
        health.push(sent.elapsed());
        let sent = Instant::now();
        let res = client.get(&forward_url).bearer_auth(token).send().await?;
        if res.status() != 200 {
            bail!("forward-auth answered {}", res.status());
        }
        forward.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    report(
        &format!("healthz with {connections} slow connections"),
        health,
        elapsed,
    );
    report(
        &format!("forward-auth with {connections} slow connections"),
        forward,
        elapsed,
    );
    println!("slow connections closed by the server (and reopened): {closed_by_server}");
    if let Some(before) = rss_before {
        println!(
            "server RSS: before={before} KiB peak={rss_peak} KiB after={} KiB",
            rss_kib(pid).unwrap_or(0)
        );
    }
    Ok(())
}

/// `keyplane_verify_cache_lookups_total{result=...}` from the server's `/metrics`.
async fn cache_lookups(client: &reqwest::Client, base: &str, result: &str) -> anyhow::Result<u64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let series = format!("keyplane_verify_cache_lookups_total{{result=\"{result}\"}} ");
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .with_context(|| format!("no {series} in /metrics"))?;
    Ok(value.trim().parse()?)
}

/// Forward-auths every token once, CONCURRENCY at a time; how many it found cached (fresh hits,
/// and reloads of entries past their 30 s lifetime: still cached, not evicted) and not cached.
async fn verify_each(
    client: &reqwest::Client,
    base: &str,
    tokens: &[String],
    concurrency: usize,
) -> anyhow::Result<(u64, u64)> {
    let cached = async || -> anyhow::Result<u64> {
        Ok(cache_lookups(client, base, "hit").await?
            + cache_lookups(client, base, "reload").await?)
    };
    let (hits, misses) = (cached().await?, cache_lookups(client, base, "miss").await?);
    let url = format!("{base}/v1/auth/forward");
    let results: Vec<anyhow::Result<()>> = stream::iter(tokens)
        .map(|token| {
            let (client, url) = (client, &url);
            async move {
                let status = client.get(url).bearer_auth(token).send().await?.status();
                if status != 200 {
                    bail!("forward-auth of a victim token answered {status}");
                }
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok((
        cached().await? - hits,
        cache_lookups(client, base, "miss").await? - misses,
    ))
}

async fn cache_flood(
    database_url: Option<String>,
    victims: usize,
    flood: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let url = database_url.unwrap_or_else(|| keyplane_store::sqlite_url_for_data_dir(temp.path()));
    let store = keyplane_store::connect(&url).await?;
    let victim =
        keyplane_server::ops::create_org(store.as_ref(), "victim", &keyplane_bench::operator())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let attacker =
        keyplane_server::ops::create_org(store.as_ref(), "attacker", &keyplane_bench::operator())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let victim_tokens: Vec<String> = seed_api_tokens(store.as_ref(), victim.tenant.id, victims)
        .await?
        .0
        .iter()
        .map(|secret| secret.expose_secret().to_string())
        .collect();
    let config = keyplane_server::Config {
        rate_limit_per_minute: 0,
        failed_auth_per_minute: 0,
        ..keyplane_server::Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(keyplane_server::serve(
        listener,
        keyplane_server::App::new(store, config),
        std::future::pending::<()>(),
    ));
    let client = client();
    let created: Value = client
        .post(format!(
            "{base}/api/v1/organizations/{}/api-tokens",
            attacker.tenant.id
        ))
        .bearer_auth(attacker.token.secret.expose_secret())
        .json(&json!({"name": "flooder", "scopes": ["tokens:verify"]}))
        .send()
        .await?
        .json()
        .await?;
    let verifier = created["token"]
        .as_str()
        .context("the attacker's verifier token")?
        .to_string();

    let (_, loaded) = verify_each(&client, &base, &victim_tokens, concurrency).await?;
    let before = verify_each(&client, &base, &victim_tokens, concurrency).await?;
    let url = format!("{base}/oauth2/introspect");
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = stream::iter(0..flood)
        .map(|_| {
            let (client, url, verifier) = (&client, &url, &verifier);
            async move {
                let random = keyplane_core::token::mint(
                    keyplane_core::CredentialKind::ApiToken,
                    &mut rand::rngs::OsRng,
                );
                let answer: Value = client
                    .post(url)
                    .bearer_auth(verifier)
                    .form(&[("token", random.plaintext.expose_secret())])
                    .send()
                    .await?
                    .json()
                    .await?;
                if answer != json!({"active": false}) {
                    bail!("a random token introspected as {answer}");
                }
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let flood_elapsed = started.elapsed();
    let after = verify_each(&client, &base, &victim_tokens, concurrency).await?;
    let ratio = |(hits, misses): (u64, u64)| hits as f64 / (hits + misses).max(1) as f64;
    println!(
        "cache-flood: victims={victims} (loaded: {loaded} misses) flood={flood} random-token introspections in {:.1}s ({:.0}/s)",
        flood_elapsed.as_secs_f64(),
        flood as f64 / flood_elapsed.as_secs_f64()
    );
    println!(
        "cache-flood: victims still cached before={:.4} (cached={} missing={}) after={:.4} (cached={} missing={})",
        ratio(before),
        before.0,
        before.1,
        ratio(after),
        after.0,
        after.1
    );
    Ok(())
}

/// Creates COUNT API tokens in ORG through BASE, 16 at a time; returns their secrets.
async fn create_tokens(
    client: &reqwest::Client,
    base: &str,
    org: &str,
    token: &str,
    scopes: &[&str],
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let url = format!("{base}/api/v1/organizations/{org}/api-tokens");
    let run = format!("{:x}", rand::random::<u32>());
    stream::iter(0..count)
        .map(|i| {
            let (url, run) = (&url, &run);
            async move {
                let res = client
                    .post(url)
                    .bearer_auth(token)
                    .json(&json!({"name": format!("bench-{run}-{i}"), "scopes": scopes}))
                    .send()
                    .await?;
                if res.status() != 201 {
                    bail!("create answered {}", res.status());
                }
                let created: Value = res.json().await?;
                Ok(created["token"]
                    .as_str()
                    .context("the created token")?
                    .to_string())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// A verifier that has heard from the stream (it refuses everything before).
async fn fresh_verifier(
    config: keyplane_verifier::VerifierConfig,
) -> anyhow::Result<keyplane_verifier::Verifier> {
    let verifier = keyplane_verifier::Verifier::new(config)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while verifier.is_stale() {
        if Instant::now() > deadline {
            bail!(
                "the verifier did not connect to the revocation stream within 10 s: {:?}",
                verifier.metrics()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(verifier)
}

fn micros(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e9).round() / 1e3
}

#[allow(clippy::too_many_arguments)]
async fn embedded_verify(
    base: &str,
    verify_token: &str,
    tokens: Option<&std::path::Path>,
    take: usize,
    org: Option<&str>,
    org_token: Option<&str>,
    seconds: u64,
    count: u64,
    threads: u32,
) -> anyhow::Result<()> {
    let client = client();
    let tokens: Vec<String> = match (tokens, org, org_token) {
        (Some(file), _, _) => std::fs::read_to_string(file)
            .context("reading the tokens file")?
            .lines()
            .take(take)
            .map(str::to_string)
            .collect(),
        (None, Some(org), Some(org_token)) => {
            create_tokens(&client, base, org, org_token, &["deploy"], take).await?
        }
        _ => bail!("give --tokens FILE, or --org and --org-token to create them"),
    };
    if tokens.is_empty() {
        bail!("no tokens to verify");
    }
    let mut config = keyplane_verifier::VerifierConfig::new(base, verify_token);
    // Every token stays cached for the whole run: this measures the cache-hit path.
    config.max_entries = tokens.len() + tokens.len() / 10 + 16;
    config.cache_ttl = Duration::from_secs(3600);
    let verifier = fresh_verifier(config).await?;
    let warmed: Vec<anyhow::Result<()>> = stream::iter(&tokens)
        .map(|token| {
            let verifier = &verifier;
            async move {
                verifier
                    .verify(token)
                    .await
                    .map(drop)
                    .map_err(|e| anyhow::anyhow!("warming: {e}"))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    warmed.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let before = verifier.metrics();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tokens = std::sync::Arc::new(tokens);
    // One thread verifies on the runtime's own thread, beside the stream task, as in every
    // sitting before `--threads` existed, so the one-core figures stay comparable.
    let mut histogram = if threads == 1 {
        verify_round_robin(&verifier, &tokens, 0, deadline, count).await?
    } else {
        // Each thread blocks in its own loop; this runtime's thread stays free for the stream.
        let handle = tokio::runtime::Handle::current();
        let loops: Vec<_> = (0..threads as usize)
            .map(|t| {
                let (verifier, tokens, handle) = (verifier.clone(), tokens.clone(), handle.clone());
                let first = t * tokens.len() / threads as usize;
                tokio::task::spawn_blocking(move || {
                    handle.block_on(verify_round_robin(
                        &verifier,
                        &tokens,
                        first,
                        deadline,
                        count / u64::from(threads),
                    ))
                })
            })
            .collect();
        let mut merged = keyplane_bench::Histogram::default();
        for one in loops {
            merged.merge(one.await.context("a verifying thread panicked")??);
        }
        merged
    };
    let elapsed = started.elapsed();
    let after = verifier.metrics();
    let verifies = histogram.count();
    println!(
        "{}",
        json!({
            "mode": "embedded-verify",
            "threads": threads,
            "tokens": tokens.len(),
            "verifies": verifies,
            "seconds": elapsed.as_secs_f64(),
            "verifies_per_second": (verifies as f64 / elapsed.as_secs_f64()).round(),
            "p50_us": micros(histogram.percentile(50.0)),
            "p99_us": micros(histogram.percentile(99.0)),
            "max_us": micros(histogram.max()),
            "cache_hits": after.cache_hits - before.cache_hits,
            "introspections": after.introspections - before.introspections,
        })
    );
    Ok(())
}

/// Verifies `tokens` in turn from `first` on until `deadline` or `count` verifies; every one
/// must be accepted (they are cached and live).
async fn verify_round_robin(
    verifier: &keyplane_verifier::Verifier,
    tokens: &[String],
    first: usize,
    deadline: Instant,
    count: u64,
) -> anyhow::Result<keyplane_bench::Histogram> {
    let mut histogram = keyplane_bench::Histogram::default();
    let mut next = first % tokens.len();
    for n in 0..count {
        if n % 1024 == 0 {
            // A cache hit never waits: let the stream task read its heartbeats now and then, as
            // a service's requests would.
            tokio::task::yield_now().await;
        }
        let sent = Instant::now();
        if sent >= deadline {
            break;
        }
        let verified = verifier.verify(&tokens[next]).await;
        histogram.record(sent.elapsed());
        if let Err(e) = verified {
            bail!("a warm token was refused: {e}; {:?}", verifier.metrics());
        }
        next = (next + 1) % tokens.len();
    }
    Ok(histogram)
}

fn summary_ms(mut samples: Vec<Duration>) -> Value {
    samples.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    json!({
        "n": samples.len(),
        "p50_ms": ms(percentile(&samples, 50.0)),
        "p99_ms": ms(percentile(&samples, 99.0)),
        "max_ms": ms(samples.last().copied().unwrap_or_default()),
    })
}

async fn verifier_revocation(
    base: &str,
    revoke_base: &str,
    org: &str,
    token: &str,
    verify_token: Option<String>,
    rounds: usize,
    round_timeout: Duration,
) -> anyhow::Result<()> {
    use keyplane_verifier::VerifyError;
    let client = client();
    let verify_token = match verify_token {
        Some(verify_token) => verify_token,
        None => create_tokens(&client, base, org, token, &["tokens:verify"], 1)
            .await?
            .remove(0),
    };
    let verifier =
        fresh_verifier(keyplane_verifier::VerifierConfig::new(base, verify_token)).await?;
    let tokens_url = format!("{revoke_base}/api/v1/organizations/{org}/api-tokens");
    let (mut applied, mut refused) = (Vec::new(), Vec::new());
    let mut refused_before_event = 0;
    let run = format!("{:x}", rand::random::<u32>());
    let started = Instant::now();
    for round in 0..rounds {
        let name = format!("verifier-revocation-{run}-{round}");
        let (id, secret) = create_token(&client, &tokens_url, token, &name).await?;
        let (id, secret) = (id.as_str(), secret.as_str());
        // The first verify asks keyplane, the second must be answered from the cache.
        verifier
            .verify(secret)
            .await
            .map_err(|e| anyhow::anyhow!("a fresh token was refused: {e}"))?;
        let hits = verifier.metrics().cache_hits;
        verifier
            .verify(secret)
            .await
            .map_err(|e| anyhow::anyhow!("a fresh token was refused: {e}"))?;
        if verifier.metrics().cache_hits != hits + 1 {
            bail!("a fresh token was not cached: {:?}", verifier.metrics());
        }
        let events = verifier.metrics().stream_events;
        let revoked_at = revoke_token(&client, &tokens_url, token, id).await?;
        let mut event_applied = None;
        // When the loop last looked at the event counter before the refusing `verify`.
        let looked = loop {
            let looked = revoked_at.elapsed();
            if event_applied.is_none() && verifier.metrics().stream_events > events {
                event_applied = Some(looked);
            }
            match verifier.verify(secret).await {
                Err(VerifyError::Inactive) => break looked,
                Ok(_) => {}
                Err(other) => bail!("verify failed: {other}"),
            }
            if revoked_at.elapsed() > round_timeout {
                bail!(
                    "the revoked token was still accepted after {round_timeout:?}: {:?}",
                    verifier.metrics()
                );
            }
            // A cache hit never waits: give the stream task its turn.
            tokio::task::yield_now().await;
        };
        refused.push(revoked_at.elapsed());
        match event_applied {
            Some(at) => applied.push(at),
            // The event landed between the last look and `verify`'s cache lookup, which follows
            // it by the microseconds of parsing and hashing the token.
            None if verifier.metrics().stream_events > events => applied.push(looked),
            None => refused_before_event += 1,
        }
    }
    println!(
        "{}",
        json!({
            "mode": "verifier-revocation",
            "verifier_follows": base,
            "revoked_through": revoke_base,
            "rounds": rounds,
            "seconds": started.elapsed().as_secs_f64(),
            "event_applied": summary_ms(applied),
            "refused": summary_ms(refused),
            "refused_before_the_event": refused_before_event,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    let runtime = match command {
        // One core's worth: the verifier's whole cost on the thread that runs the load.
        Command::EmbeddedVerify { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    runtime.block_on(run(command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Seed {
            database_url,
            count,
            tokens_out,
        } => seed(&database_url, count, &tokens_out).await,
        Command::Create {
            base,
            org,
            token,
            count,
            concurrency,
        } => create(&base, &org, &token, count, concurrency).await,
        Command::ColdVerify {
            base,
            tokens,
            count,
            concurrency,
        } => cold_verify(&base, &tokens, count, concurrency).await,
        Command::Propagation {
            bases,
            org,
            token,
            rounds,
        } => propagation(&bases, &org, &token, rounds).await,
        Command::SlowClients {
            base,
            token,
            pid,
            connections,
            seconds,
        } => slow_clients(&base, &token, pid, connections, seconds).await,
        Command::CacheFlood {
            database_url,
            victims,
            flood,
            concurrency,
        } => cache_flood(database_url, victims, flood, concurrency).await,
        Command::EmbeddedVerify {
            base,
            verify_token,
            tokens,
            take,
            org,
            org_token,
            seconds,
            count,
            threads,
        } => {
            embedded_verify(
                &base,
                &verify_token,
                tokens.as_deref(),
                take,
                org.as_deref(),
                org_token.as_deref(),
                seconds,
                count,
                threads,
            )
            .await
        }
        Command::VerifierRevocation {
            base,
            revoke_base,
            org,
            token,
            verify_token,
            rounds,
            round_timeout_seconds,
        } => {
            let revoke_base = revoke_base.unwrap_or_else(|| base.clone());
            verifier_revocation(
                &base,
                &revoke_base,
                &org,
                &token,
                verify_token,
                rounds,
                Duration::from_secs(round_timeout_seconds),
            )
            .await
        }
    }
}

/// Creates an API token named `name` through the Aether API at `tokens_url`; its id and secret.
async fn create_token(
    client: &reqwest::Client,
    tokens_url: &str,
    token: &str,
    name: &str,
) -> anyhow::Result<(String, String)> {
    let res = client
        .post(tokens_url)
        .bearer_auth(token)
        .json(&json!({ "name": name }))
        .send()
        .await?;
    if res.status() != 201 {
        bail!("create answered {}", res.status());
    }
    let created: Value = res.json().await?;
    Ok((
        created["id"].as_str().context("created id")?.to_string(),
        created["token"]
            .as_str()
            .context("created token")?
            .to_string(),
    ))
}

/// Revokes token `id` through the Aether API at `tokens_url`; when the revocation answered.
async fn revoke_token(
    client: &reqwest::Client,
    tokens_url: &str,
    token: &str,
    id: &str,
) -> anyhow::Result<Instant> {
    let res = client
        .delete(format!("{tokens_url}/{id}"))
        .bearer_auth(token)
        .send()
        .await?;
    let revoked_at = Instant::now();
    if res.status() != 204 {
        bail!("revoke answered {}", res.status());
    }
    Ok(revoked_at)
}
