//! The audit trail's moving parts around HTTP: the request context of an event, the bounded record
//! of refused attempts, the `--audit-log` export and retention. The rules (event shape, canonical
//! bytes, chain) are in `keyplane_core::audit`; changes' events are built in [`crate::ops`] and
//! written by the store in the change's own transaction.

use crate::app::App;
use crate::config::BackgroundJob;
use axum::http::{header, Extensions, HeaderMap, StatusCode};
use keyplane_core::audit::{actions, ActorType, AuditActor, DetailValue};
use keyplane_core::{AuditEvent, Principal, RequestContext, TenantId};
use keyplane_store::{AuditQuery, Store};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Where an event's request came from. The one place the client address and the request id are
/// read for the audit trail.
pub fn request_context(headers: &HeaderMap, extensions: &Extensions) -> RequestContext {
    // Set for each request by the connection (the trusted-proxy rule's answer, `connection.rs`)
    // and the observer (`router.rs`).
    request_context_of(headers, &crate::request_id::Origin::of(extensions))
}

/// [`request_context`] for a handler that took its [`crate::request_id::Origin`] as an argument.
pub(crate) fn request_context_of(
    headers: &HeaderMap,
    origin: &crate::request_id::Origin,
) -> RequestContext {
    let request_id = origin.request_id.as_ref().map(ToString::to_string);
    let client_ip = origin.client.map(|client| client.0.to_string());
    RequestContext::new(
        request_id.as_deref(),
        client_ip,
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
    )
}

/// Filled by the `Authenticated` extractor (and the console's), read after the response: who was
/// refused.
#[derive(Clone, Default)]
pub(crate) struct CallerSlot(Arc<OnceLock<Caller>>);

struct Caller {
    principal: Principal,
    /// The organization a console session acts in: its paths name none, only the resource.
    /// `None`: the path's first id is the organization (the APIs).
    organization: Option<TenantId>,
}

impl CallerSlot {
    pub(crate) fn set(&self, principal: &Principal) {
        self.fill(principal, None);
    }

    /// A console request, acting in the session's `organization`.
    pub(crate) fn set_in(&self, principal: &Principal, organization: TenantId) {
        self.fill(principal, Some(organization));
    }

    fn fill(&self, principal: &Principal, organization: Option<TenantId>) {
        let _ = self.0.set(Caller {
            principal: principal.clone(),
            organization,
        });
    }
}

/// Whether `path` is a management API whose refusals are recorded.
fn is_management(path: &str) -> bool {
    path.starts_with("/api/v1/organizations/")
        || path.starts_with("/v1/public/accounts/")
        || path.starts_with("/console/")
}

/// Before a request: a slot for its caller, on management routes only (verification stays free).
pub(crate) fn watch_request(request: &mut axum::extract::Request) -> Option<CallerSlot> {
    if !is_management(request.uri().path()) {
        return None;
    }
    let slot = CallerSlot::default();
    request.extensions_mut().insert(slot.clone());
    Some(slot)
}

/// After a request: a 403 or 404 to an authenticated caller is a refused attempt.
pub(crate) struct Watched {
    pub slot: CallerSlot,
    pub context: RequestContext,
    pub method: &'static str,
    pub route: &'static str,
    pub path: String,
}

pub(crate) fn after_response(app: &App, watched: Watched, status: StatusCode) {
    if status != StatusCode::FORBIDDEN && status != StatusCode::NOT_FOUND {
        return;
    }
    let Some(caller) = watched.slot.0.get() else {
        return;
    };
    let principal = &caller.principal;
    let mut ids = watched
        .path
        .split('/')
        .filter_map(|segment| uuid::Uuid::parse_str(segment).ok());
    let org = match caller.organization {
        Some(org) => Some(org.as_uuid()),
        None => ids.next(),
    };
    // The thing the route acts on is its first id after the organization's (a webhook's, not its
    // delivery's); `resource_id` names the last one in the path.
    let acted_on = ids.next();
    let resource = ids.next_back().or(acted_on);
    // The event goes where the caller belongs: the org it asked for when it holds rights there, or
    // its own tenant (a credential probing another org). A user holding nothing there has no
    // tenant of its own: counted in metrics only.
    let home = org
        .map(TenantId::from_uuid)
        .filter(|org| principal.rights_in(*org).is_some())
        .or_else(|| match principal.tenants() {
            [(only, _)] if principal.user_id().is_none() => Some(*only),
            _ => None,
        });
    let Some(home) = home else {
        app.inner().metrics.audit_refusal_unrecorded();
        return;
    };
    let attempted = format!("{} {}", watched.method, watched.route);
    let key = RefusalKey {
        tenant: home,
        actor: Some(principal.id()),
        attempted: attempted.clone(),
        target: resource.or(org),
    };
    let mut event = AuditEvent::new(
        uuid::Uuid::now_v7(),
        home,
        crate::ops::now(),
        actions::ACCESS_DENIED,
        AuditActor::of(principal),
        watched.context,
    )
    .denied()
    .text("attempted", attempted)
    .detail("status", DetailValue::Count(u64::from(status.as_u16())));
    // A target, so that `target_id` finds the attempts on a resource, as it finds its changes.
    match (acted_on, target_type(watched.route), org) {
        (Some(id), Some(target_type), _) => event = event.target(target_type, id, None),
        (None, _, Some(org)) => event = event.target("organization", org, None),
        _ => {}
    }
    if let Some(org) = org {
        event = event.text("org_id", org.to_string());
    }
    if let Some(resource) = resource {
        event = event.text("resource_id", resource.to_string());
    }
    app.inner()
        .refusals
        .record(key, event, &app.inner().metrics);
}

/// What a route's first id after the organization's names, as events name targets (from its
/// path template, e.g. `/api/v1/organizations/{orgID}/api-tokens/{id}/rotate`, or the console's
/// `/console/robots/{id}/rotate`).
fn target_type(route: &str) -> Option<&'static str> {
    [
        ("/api-tokens/{", "api_token"),
        ("/robot-accounts/{", "robot_account"),
        ("/robots/{", "robot_account"),
        ("/service-accounts/{", "service_account"),
        ("/authorizations/{", "authorization"),
        ("/grants/{", "authorization"),
        ("/webhooks/{", "webhook"),
    ]
    .into_iter()
    .find(|(segment, _)| route.contains(segment))
    .map(|(_, target_type)| target_type)
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    tenant: TenantId,
    /// `None`: the tenant's refusals folded past [`MAX_KEYS_PER_TENANT`], whoever's.
    actor: Option<uuid::Uuid>,
    attempted: String,
    target: Option<uuid::Uuid>,
}

/// At most this many distinct refusals per tenant per window; more are folded into one per actor.
const KEYS_PER_TENANT: usize = 32;
/// At most this many pending keys per tenant, its actors' folds included; the last is one
/// `(various)` for the whole tenant, so that a tenant refused under many actors (its own expired
/// tokens introspected one by one) keeps its count without taking the room other tenants need.
const MAX_KEYS_PER_TENANT: usize = 64;
/// At most this many pending refusals in all; more are dropped and counted in metrics.
const MAX_PENDING: usize = 10_000;
/// Past this many pending, a tenant's new refusals fold into its one `(various)`: the rest of
/// [`MAX_PENDING`] is kept for other tenants' first keys (and those folds).
const SHARED_PENDING: usize = MAX_PENDING / 2;

/// Refused attempts, aggregated in memory: one `access.denied` event per (tenant, actor, attempt,
/// target) per window, carrying how many times it happened (`count`). So a caller hammering
/// refusals writes at most [`KEYS_PER_TENANT`] + 1 events per tenant per window, and a tenant at
/// most [`MAX_KEYS_PER_TENANT`].
pub(crate) struct Refusals {
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    events: HashMap<RefusalKey, (AuditEvent, u64)>,
    keys_per_tenant: HashMap<TenantId, usize>,
    /// Events (as written, with their counts) whose write failed while committing, so may have
    /// been made. Retried as they are, under the same id, which the store does not write twice;
    /// never merged with later refusals, whose count they would then carry in twice. At most one:
    /// these go first in a flush, and a flush stops at its first failure.
    unacknowledged: Vec<(AuditEvent, u64)>,
}

impl Pending {
    /// `count` refusals under `key`: added to the same key's, folded into the actor's
    /// `(various)` past [`KEYS_PER_TENANT`], into the tenant's past [`MAX_KEYS_PER_TENANT`] or
    /// [`SHARED_PENDING`], dropped (and counted) past [`MAX_PENDING`].
    fn add(
        &mut self,
        mut key: RefusalKey,
        mut event: AuditEvent,
        count: u64,
        metrics: &crate::metrics::Metrics,
    ) {
        if self.merge(&key, count) {
            return;
        }
        let held = self.keys_per_tenant.get(&key.tenant).copied().unwrap_or(0);
        if held >= KEYS_PER_TENANT && key.actor.is_some() {
            key.attempted = "(various)".into();
            key.target = None;
            event.target = None;
            event.details.clear();
            event = event.text("attempted", "(various)");
            if self.merge(&key, count) {
                return;
            }
        }
        // A tenant's first key is its own whatever the others hold; past that, a crowded queue
        // or the tenant's last key takes the rest of its refusals as one.
        if held + 1 >= MAX_KEYS_PER_TENANT || (held > 0 && self.events.len() >= SHARED_PENDING) {
            // Many actors' refusals in one event: the server's summary, with no one's request.
            key = RefusalKey {
                tenant: key.tenant,
                actor: None,
                attempted: "(various)".into(),
                target: None,
            };
            event.actor = AuditActor::system();
            event.target = None;
            event.context = RequestContext::default();
            event.details.clear();
            event = event
                .text("attempted", "(various)")
                .text("actors", "(various)");
            if self.merge(&key, count) {
                return;
            }
        }
        if self.events.len() >= MAX_PENDING {
            metrics.audit_refusals_dropped(count);
            return;
        }
        *self.keys_per_tenant.entry(key.tenant).or_default() += 1;
        self.events.insert(key, (event, count));
    }

    /// Adds `count` to `key`'s pending refusals, if it has any.
    fn merge(&mut self, key: &RefusalKey, count: u64) -> bool {
        match self.events.get_mut(key) {
            Some((_, pending)) => {
                *pending += count;
                true
            }
            None => false,
        }
    }
}

impl Refusals {
    pub(crate) fn new() -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
        }
    }

    fn record(&self, key: RefusalKey, event: AuditEvent, metrics: &crate::metrics::Metrics) {
        self.lock().add(key, event, 1, metrics);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A presented credential that is known but revoked, expired or of the wrong kind.
    pub(crate) fn credential_refused(
        &self,
        credential: &keyplane_core::CredentialIdentity,
        reason: &str,
        context: RequestContext,
        metrics: &crate::metrics::Metrics,
    ) {
        let key = RefusalKey {
            tenant: credential.tenant_id,
            actor: Some(credential.id.as_uuid()),
            attempted: reason.to_string(),
            target: Some(credential.id.as_uuid()),
        };
        let event = AuditEvent::new(
            uuid::Uuid::now_v7(),
            credential.tenant_id,
            crate::ops::now(),
            actions::ACCESS_DENIED,
            AuditActor {
                actor_type: ActorType::of_credential(credential.kind),
                id: Some(credential.id.as_uuid()),
                issuer: None,
                subject: None,
            },
            context,
        )
        .denied()
        .target(
            credential.kind.as_str(),
            credential.id.as_uuid(),
            Some(&credential.name),
        )
        .text("attempted", "authenticate")
        .text("reason", reason);
        self.record(key, event, metrics);
    }

    /// Writes one event per pending refusal, with its count. What the store cannot take now
    /// (each write under [`BackgroundJob::RefusalFlush`]'s deadline) is queued again (merged
    /// with refusals that came meanwhile, within the bounds), to be written by the next flush; on
    /// the `last` flush, or when the store refuses the event itself, it is dropped and counted.
    pub(crate) async fn flush(&self, app: &App, last: bool) {
        let (store, metrics) = (app.store(), &app.inner().metrics);
        let (unacknowledged, drained) = {
            let mut pending = self.lock();
            pending.keys_per_tenant.clear();
            let drained: Vec<_> = pending.events.drain().collect();
            (std::mem::take(&mut pending.unacknowledged), drained)
        };
        // Each write: the refusals it carries (`None`: an unacknowledged write, already counted)
        // and the event as written.
        let mut writes = unacknowledged
            .into_iter()
            .map(|(written, count)| (None, written, count))
            .chain(drained.into_iter().map(|(key, (event, count))| {
                let written = event.clone().detail("count", DetailValue::Count(count));
                (Some((key, event)), written, count)
            }));
        while let Some((refusals, written, count)) = writes.next() {
            let appended = crate::jobs::bounded(
                app,
                BackgroundJob::RefusalFlush,
                store.append_audit_event(&written),
            );
            let Err(error) = appended.await.unwrap_or_else(|late| Err(late.into())) else {
                continue;
            };
            if !matches!(error, keyplane_store::StoreError::Unavailable(_)) {
                tracing::warn!(%error, tenant.id = %written.tenant_id, count, "cannot record refused attempts; dropped");
                metrics.audit_refusals_dropped(count);
                continue;
            }
            // The store is away: keep this and the rest for the next flush rather than try each;
            // the last flush has no next one.
            if last {
                let lost = count + writes.map(|(_, _, count)| count).sum::<u64>();
                tracing::warn!(%error, count = lost, "cannot record refused attempts at shutdown; dropped");
                metrics.audit_refusals_dropped(lost);
                return;
            }
            // A write that may have been made is retried as it was; the others (never made) are
            // queued again, and may merge with refusals that came meanwhile.
            let failed = if error.may_have_committed() {
                (None, written, count)
            } else {
                (refusals, written, count)
            };
            let mut pending = self.lock();
            let mut kept = 0;
            for (refusals, written, count) in std::iter::once(failed).chain(writes) {
                match refusals {
                    Some((key, event)) => pending.add(key, event, count, metrics),
                    None => pending.unacknowledged.push((written, count)),
                }
                kept += 1;
            }
            tracing::warn!(%error, events = kept, "cannot record refused attempts; will retry");
            return;
        }
    }
}

/// Where `serve --audit-log` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditLogTarget {
    Stdout,
    File(PathBuf),
}

impl AuditLogTarget {
    /// `-` is stdout.
    pub fn parse(raw: &str) -> Self {
        if raw == "-" {
            AuditLogTarget::Stdout
        } else {
            AuditLogTarget::File(PathBuf::from(raw))
        }
    }

    /// Opens the log as the export will (creating the file, 0600, if it is missing) and closes it
    /// again: a start-up check, so that a path the server cannot append to stops the start
    /// instead of leaving the export retrying.
    pub fn check(&self) -> std::io::Result<()> {
        Sink::open(self).map(drop)
    }

    /// Why an empty store must not be bootstrapped with this log (`serve` refuses it unless
    /// `--allow-empty-store`): the file already holds exported events, or its heads file names
    /// organizations. `None` for stdout, or a log never exported to.
    pub fn exported_before(&self) -> std::io::Result<Option<String>> {
        match self {
            AuditLogTarget::Stdout => Ok(None),
            AuditLogTarget::File(path) => crate::export_heads::exported_before(path),
        }
    }

    /// Where the export records how far it wrote (`<log>.heads`); none for stdout.
    fn heads_path(&self) -> Option<PathBuf> {
        match self {
            AuditLogTarget::Stdout => None,
            AuditLogTarget::File(path) => Some(crate::export_heads::path_for(path)),
        }
    }

    /// The name its cursors are stored under.
    fn consumer(&self) -> String {
        match self {
            AuditLogTarget::Stdout => "stdout".into(),
            AuditLogTarget::File(path) => format!(
                "file:{}",
                std::path::absolute(path).unwrap_or(path.clone()).display()
            ),
        }
    }
}

/// How often the export looks for new events.
const EXPORT_POLL: Duration = Duration::from_millis(200);
const EXPORT_BATCH: u32 = 500;
/// The longest wait between attempts to open a log that cannot be opened, or to save cursors that
/// could not be saved (the wait starts at [`EXPORT_POLL`] and doubles), so a file that goes away
/// or a store that fails does not flood the log.
const EXPORT_RETRY_MAX: Duration = Duration::from_secs(30);

enum Sink {
    Stdout(std::io::Stdout),
    /// `torn`: a write failed, so the file may end in part of a line.
    File {
        file: std::fs::File,
        torn: bool,
    },
}

impl Sink {
    fn open(target: &AuditLogTarget) -> std::io::Result<Self> {
        Ok(match target {
            AuditLogTarget::Stdout => Sink::Stdout(std::io::stdout()),
            AuditLogTarget::File(path) => {
                let mut options = std::fs::OpenOptions::new();
                // Read too: the last byte tells whether the file ends in a cut line.
                options.create(true).append(true).read(true);
                // The events hold client addresses, user agents, user ids and credential names:
                // a new file is readable by its owner only, whatever the umask. The mode applies
                // only when the file is created; an existing one (e.g. made by logrotate's
                // `create`) keeps its own.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o600);
                }
                let mut file = options.open(path)?;
                end_torn_line(&mut file)?;
                Sink::File { file, torn: false }
            }
        })
    }

    /// Writes and makes durable `lines` before the cursor moves past them.
    fn write_durably(&mut self, lines: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(lines)?;
                out.flush()
            }
            Sink::File { file, torn } => {
                if *torn {
                    end_torn_line(file)?;
                    *torn = false;
                }
                let written = file.write_all(lines).and_then(|()| file.sync_data());
                *torn = written.is_err();
                written
            }
        }
    }
}

/// Ends the line a regular file's last bytes leave open (a write cut by SIGKILL, by the node going
/// down before the sync, by a full disk): the next line written starts a line of its own, or the
/// first event re-exported would be glued to the fragment, one invalid line, lost to every reader.
/// The fragment is ended with a newline rather than cut off: bytes already in the file (perhaps
/// shipped already, or in an append-only file) are never taken back, and the event it began is
/// written again whole, as the export resumes from its saved cursor.
fn end_torn_line(file: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::{Read, Seek, Write};
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.len() == 0 {
        return Ok(());
    }
    // Appends go to the end whatever the position: reading moves only where reads start.
    let mut last = [0u8];
    file.seek(std::io::SeekFrom::End(-1))?;
    file.read_exact(&mut last)?;
    if last != *b"\n" {
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    Ok(())
}

/// How long the audit log's thread may leave an open or a write unanswered before the export
/// says it is stalled (a FIFO nobody reads, a hung mount, a stdout pipe nobody drains).
const WRITE_STALLED_AFTER: Duration = Duration::from_secs(5);
/// How often a stall that lasts is said again at `warn` (between, at `debug`): the first line
/// may have gone with a rotated log, and one line says nothing of a stall still going on.
const STALL_REPEAT: Duration = Duration::from_secs(60);

/// The audit log's file work (open, write, sync) on a thread of its own. A destination that takes
/// nothing more blocks that thread, not one of the runtime's workers, and the export waits for it
/// as any other future, so a stop can leave it behind at its deadline: a thread blocked in a
/// write does not keep the process from exiting, where a `spawn_blocking` task would keep the
/// runtime's shutdown waiting for it.
struct SinkThread {
    jobs: std::sync::mpsc::Sender<SinkJob>,
    thread: std::thread::JoinHandle<()>,
}

type SinkJob = Box<dyn FnOnce(&mut Option<Sink>) + Send>;

impl SinkThread {
    fn spawn() -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<SinkJob>();
        let thread = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                let mut sink = None;
                // Until the export drops its end (it stopped, or was stopped).
                for job in queue {
                    job(&mut sink);
                }
            })?;
        Ok(Self { jobs, thread })
    }

    /// Whether the thread is gone (a job panicked): the export starts another.
    fn ended(&self) -> bool {
        self.thread.is_finished()
    }

    /// Runs `job` on the thread and waits for its answer, telling `stall` while none comes.
    async fn run<R: Send + 'static>(
        &self,
        stall: &mut Stall,
        job: impl FnOnce(&mut Option<Sink>) -> std::io::Result<R> + Send + 'static,
    ) -> std::io::Result<R> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |sink| {
                let _ = answer.send(job(sink));
            }))
            .map_err(|_| std::io::Error::other("the audit log's thread has ended"))?;
        let mut answered = std::pin::pin!(answered);
        let mut unanswered = Unanswered(Some(stall.consumer.clone()));
        let started = tokio::time::Instant::now();
        loop {
            if let Ok(answer) = tokio::time::timeout(WRITE_STALLED_AFTER, &mut answered).await {
                unanswered.0 = None;
                return answer
                    .unwrap_or_else(|_| Err(std::io::Error::other("the audit log's thread died")));
            }
            stall.unanswered(started.elapsed());
        }
    }
}

/// Dropped with its log name in it, the export was stopped (at a stop's deadline) while the
/// audit log's thread had not answered: says so.
struct Unanswered(Option<String>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(consumer) = &self.0 {
            tracing::warn!(audit_log = %consumer, "audit export left mid-write: the audit log did not take its lines before the stop's deadline; the next start writes them again");
        }
    }
}

/// Whether the export is stalled (passes failing, or the audit log not answering), and what was
/// said of it: a stall is said when it begins, again every [`STALL_REPEAT`] while it lasts, and
/// once when the export goes on.
struct Stall {
    consumer: String,
    /// When the stall began.
    since: Option<tokio::time::Instant>,
    /// When it was last said at `warn`.
    said_at: Option<tokio::time::Instant>,
}

impl Stall {
    fn new(consumer: &str) -> Self {
        Self {
            consumer: consumer.to_owned(),
            since: None,
            said_at: None,
        }
    }

    /// Marks the stall (begun now if it was not), and whether it is time to say it at `warn`.
    fn mark(&mut self) -> (Duration, bool) {
        let now = tokio::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        let say = self
            .said_at
            .is_none_or(|at| now.duration_since(at) >= STALL_REPEAT);
        if say {
            self.said_at = Some(now);
        }
        (now.duration_since(since), say)
    }

    /// A pass failed.
    fn failed(&mut self, error: &str) {
        let first = self.since.is_none();
        let (stalled_for, say) = self.mark();
        let consumer = &self.consumer;
        let stalled_s = stalled_for.as_secs();
        if first {
            tracing::warn!(%error, audit_log = %consumer, "audit export stalled; retrying with growing waits until it goes on");
        } else if say {
            tracing::warn!(%error, audit_log = %consumer, stalled_s, "audit export still stalled; retrying with growing waits until it goes on");
        } else {
            tracing::debug!(%error, audit_log = %consumer, stalled_s, "audit export still stalled");
        }
    }

    /// An open or a write of the audit log has not returned after `waited`.
    fn unanswered(&mut self, waited: Duration) {
        let (stalled_for, say) = self.mark();
        let consumer = &self.consumer;
        let (waited_s, stalled_s) = (waited.as_secs(), stalled_for.as_secs());
        if say {
            tracing::warn!(audit_log = %consumer, waited_s, stalled_s, "audit export stalled: a write to the audit log has not returned (a FIFO nobody reads? a hung mount?); events wait, see keyplane_audit_export_lag_seconds");
        } else {
            tracing::debug!(audit_log = %consumer, waited_s, stalled_s, "audit export still stalled");
        }
    }

    /// A pass went through.
    fn went_on(&mut self) {
        if self.since.take().is_some() {
            tracing::info!(audit_log = %self.consumer, "audit export goes on");
        }
        self.said_at = None;
    }
}

/// Exports every committed event as one JSON line, at least once: lines are written and synced
/// before the per-tenant cursors (in the store) move, so after a crash the export resumes from the
/// last saved cursor and may repeat events (same `id`), never skip one. `reopen` (SIGHUP) reopens
/// the file for log rotation. The file work is done on a thread of its own ([`SinkThread`]).
pub(crate) async fn export(
    app: App,
    target: AuditLogTarget,
    reopen: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let consumer = target.consumer();
    let metrics = app.inner().metrics.clone();
    // Caught up as of now: the lag counts from the start until the first pass is through.
    metrics.audit_export_caught_up(std::time::Instant::now());
    let mut stall = Stall::new(&consumer);
    let mut thread: Option<SinkThread> = None;
    // Whether the thread holds the log open.
    let mut open = false;
    // The wait before the next attempt to open the log: doubled at each failure, up to
    // EXPORT_RETRY_MAX.
    let mut reopen_wait = EXPORT_POLL;
    let mut progress: Option<ExportProgress> = None;
    // While passes fail (the store away, the log unwritable): the wait before the next one,
    // doubled at each failure as the reopen's is.
    let mut retry_wait: Option<Duration> = None;
    loop {
        if thread.as_ref().is_some_and(SinkThread::ended) {
            thread = None;
            open = false;
        }
        if thread.is_none() {
            match SinkThread::spawn() {
                Ok(spawned) => thread = Some(spawned),
                Err(error) => {
                    tracing::error!(%error, audit_log = %consumer, "cannot start the audit log's thread; retrying")
                }
            }
        }
        if let (Some(sink), false) = (&thread, open) {
            let target = target.clone();
            let opened = sink
                .run(&mut stall, move |sink| {
                    *sink = None;
                    *sink = Some(Sink::open(&target)?);
                    Ok(())
                })
                .await;
            match opened {
                Ok(()) => {
                    open = true;
                    reopen_wait = EXPORT_POLL;
                }
                Err(error) => {
                    tracing::error!(%error, audit_log = %consumer, retry_in = ?reopen_wait, "cannot open the audit log; retrying");
                }
            }
        }
        let mut failure = None;
        if progress.is_none() {
            let loaded = crate::jobs::bounded(
                &app,
                BackgroundJob::AuditExport,
                ExportProgress::load(&app, &target, &consumer),
            );
            match loaded.await.unwrap_or_else(|late| Err(late.into())) {
                Ok(loaded) => progress = Some(loaded),
                Err(error) => failure = Some(format!("cannot read the export cursors: {error}")),
            }
        }
        let mut passed = false;
        if let (Some(sink), true, Some(at)) = (&thread, open, progress.as_mut()) {
            let began = std::time::Instant::now();
            match export_pending(&app, &consumer, sink, &mut stall, at).await {
                Ok(()) => {
                    passed = true;
                    metrics.audit_export_caught_up(began);
                }
                Err(error) => failure = Some(format!("{error:#}")),
            }
        }
        retry_wait = match (failure, retry_wait) {
            (Some(error), wait) => {
                stall.failed(&error);
                Some(wait.map_or(EXPORT_POLL, next_retry_wait))
            }
            (None, _) if passed => {
                stall.went_on();
                None
            }
            (None, wait) => wait,
        };
        let wait = if open {
            retry_wait.unwrap_or(EXPORT_POLL)
        } else {
            let wait = reopen_wait;
            reopen_wait = next_retry_wait(reopen_wait);
            wait
        };
        let stopping = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = reopen.notified() => {
                // A SIGHUP tries at once, however long the wait had grown.
                open = false;
                reopen_wait = EXPORT_POLL;
                false
            }
            _ = stop.changed() => true,
        };
        if stopping {
            // One last pass, so a clean shutdown leaves nothing behind.
            if let (Some(sink), true, Some(at)) = (&thread, open, progress.as_mut()) {
                let _ = export_pending(&app, &consumer, sink, &mut stall, at).await;
                at.next_save = tokio::time::Instant::now();
                at.save(&app, &consumer).await;
            }
            return;
        }
    }
}

/// The wait after `wait` between failed attempts (to open the log, to save the cursors):
/// doubled, at most [`EXPORT_RETRY_MAX`].
fn next_retry_wait(wait: Duration) -> Duration {
    (wait * 2).min(EXPORT_RETRY_MAX)
}

/// Earlier positions kept per tenant, to go back to when the chain went back: one per batch
/// written, so about the last this many polls that found events.
const EXPORT_CHECKPOINTS: usize = 64;

/// Where the export is in one tenant's chain.
#[derive(Default)]
struct ExportCursor {
    /// Every event up to this seq has been written.
    seq: u64,
    /// The chain hash of the event at `seq`: the chain still is the one written while the event
    /// there has it. `None` until read (a cursor loaded from the store, which is saved in the same
    /// database as the chain and so goes back with it).
    hash: Option<[u8; 32]>,
    /// Earlier positions written and their hashes, oldest first.
    written: std::collections::VecDeque<(u64, [u8; 32])>,
}

impl ExportCursor {
    fn advance(&mut self, seq: u64, hash: [u8; 32]) {
        if let Some(previous) = self.hash {
            if self.written.len() == EXPORT_CHECKPOINTS {
                self.written.pop_front();
            }
            self.written.push_back((self.seq, previous));
        }
        self.seq = seq;
        self.hash = Some(hash);
    }
}

/// The export's cursors, and those it moved past written lines but could not save yet.
struct ExportProgress {
    cursors: HashMap<TenantId, ExportCursor>,
    unsaved: HashMap<TenantId, u64>,
    /// A save that failed is tried again only after this wait (doubled at each failure, up to
    /// [`EXPORT_RETRY_MAX`]): the lines are written, only the cursor is missing.
    save_wait: Duration,
    next_save: tokio::time::Instant,
    /// The heads file beside the log (none for stdout).
    heads: Option<HeadsRecord>,
}

/// What the export keeps in `<log>.heads` ([`crate::export_heads`]).
struct HeadsRecord {
    path: PathBuf,
    heads: crate::export_heads::Heads,
    /// Moved since the file was last written.
    dirty: bool,
    /// The last write failed (said once, and once when one works again).
    failing: bool,
}

impl HeadsRecord {
    fn moved(&mut self, tenant: TenantId, seq: u64, hash: [u8; 32]) {
        if self.heads.insert(tenant, (seq, hash)) != Some((seq, hash)) {
            self.dirty = true;
        }
    }
}

impl ExportProgress {
    /// The saved cursors, checked against the heads file beside the log: an organization whose
    /// chain in the store is behind what the log holds (the store restored from a backup,
    /// recovered to an earlier point, failed over, or lost) is reported, and its cursor is set
    /// to what the log holds so that the first pass goes back as it does for a failover seen
    /// while running.
    async fn load(
        app: &App,
        target: &AuditLogTarget,
        consumer: &str,
    ) -> Result<Self, keyplane_store::StoreError> {
        let store = app.store().as_ref();
        let mut progress = Self::from_saved(store.audit_export_cursors(consumer).await?);
        let Some(path) = target.heads_path() else {
            return Ok(progress);
        };
        let recorded = crate::export_heads::read(&path).unwrap_or_else(|error| {
            tracing::warn!(%error, path = %path.display(), "cannot read the audit log's heads file: the store is not checked against what the log holds; the file is written again after the next events exported");
            None
        });
        let exported = progress.cursors.values().map(|c| c.seq).max().unwrap_or(0);
        if recorded.is_none() && exported > 0 && log_is_empty(target) {
            tracing::warn!(audit_log = %consumer, export.seq = exported, "the audit log is empty (new, or emptied) but this export's cursors, kept in the store under its path, are past events it wrote there: only events after them are exported, the earlier ones are not written again; to export every event the store holds, point --audit-log at a new path");
        }
        let mut record = HeadsRecord {
            path,
            heads: recorded.unwrap_or_default(),
            dirty: false,
            failing: false,
        };
        if !record.heads.is_empty() {
            let chains: HashMap<TenantId, (u64, [u8; 32])> = store
                .audit_heads()
                .await?
                .into_iter()
                .map(|(tenant, seq, hash)| (tenant, (seq, hash)))
                .collect();
            for (tenant, (seq, hash)) in record.heads.clone() {
                let chain = chains.get(&tenant).copied();
                if !went_back(store, tenant, chain, seq, hash).await? {
                    continue;
                }
                let head = chain.map_or(0, |(head, _)| head);
                if head < seq {
                    tracing::error!(tenant.id = %tenant, export.seq = seq, chain.head = head, audit_log = %consumer, "the store is behind the audit log: organization {tenant}'s chain ends at seq {head} but the audit log holds its events up to seq {seq} (the store restored from a backup, recovered to an earlier point, failed over to a standby missing commits, or lost?); its new events reuse seqs the log already holds");
                } else {
                    tracing::error!(tenant.id = %tenant, export.seq = seq, chain.head = head, audit_log = %consumer, "the store is behind the audit log: organization {tenant}'s event at seq {seq} is not the one the audit log holds there (the store's head is seq {head}; the store restored from a backup or recovered to an earlier point, and written to since?)");
                }
                report_behind(app, tenant, seq, head);
                if chain.is_none() {
                    // The store holds none of its events: nothing to go back to. Forgotten, so
                    // that the next start does not report it again.
                    progress.cursors.remove(&tenant);
                    record.heads.remove(&tenant);
                    record.dirty = true;
                    continue;
                }
                let cursor = progress.cursors.entry(tenant).or_default();
                // The store's own cursor went back with its chain, so the events up to it were
                // written from this very chain: the first pass goes back there, else to the
                // chain's anchor.
                let mut written = std::collections::VecDeque::new();
                if cursor.seq < seq {
                    if let Some(at) = event_hash_at(store, tenant, cursor.seq).await? {
                        written.push_back((cursor.seq, at));
                    }
                }
                *cursor = ExportCursor {
                    seq,
                    hash: Some(hash),
                    written,
                };
            }
        }
        progress.heads = Some(record);
        Ok(progress)
    }

    fn from_saved(saved: Vec<(TenantId, u64)>) -> Self {
        Self {
            cursors: saved
                .into_iter()
                .map(|(tenant, seq)| {
                    let hash = (seq == 0).then_some(keyplane_core::audit::GENESIS);
                    (
                        tenant,
                        ExportCursor {
                            seq,
                            hash,
                            ..ExportCursor::default()
                        },
                    )
                })
                .collect(),
            unsaved: HashMap::new(),
            save_wait: EXPORT_POLL,
            next_save: tokio::time::Instant::now(),
            heads: None,
        }
    }

    /// Writes the heads file if the cursors moved since, on the log's thread (the file is beside
    /// the log, on the same mount). A failure is said and tried again after the next pass.
    async fn write_heads(&mut self, sink: &SinkThread, stall: &mut Stall) {
        let Some(record) = self.heads.as_mut().filter(|r| r.dirty) else {
            return;
        };
        let (path, heads) = (record.path.clone(), record.heads.clone());
        match sink
            .run(stall, move |_| crate::export_heads::write(&path, &heads))
            .await
        {
            Ok(()) => {
                record.dirty = false;
                if std::mem::take(&mut record.failing) {
                    tracing::info!(path = %record.path.display(), "the audit log's heads file is written again");
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut record.failing, true) {
                    tracing::warn!(%error, path = %record.path.display(), "cannot write the audit log's heads file (the events are written; a later start could not tell that the store went back past them); retrying after each pass");
                }
            }
        }
    }

    /// Saves the cursors moved since the last save, unless a failed save's wait is not over.
    async fn save(&mut self, app: &App, consumer: &str) {
        if self.unsaved.is_empty() || tokio::time::Instant::now() < self.next_save {
            return;
        }
        let cursors: Vec<(TenantId, u64)> = self.unsaved.iter().map(|(t, s)| (*t, *s)).collect();
        let saved = crate::jobs::bounded(
            app,
            BackgroundJob::AuditExport,
            app.store().save_audit_export_cursors(consumer, &cursors),
        );
        match saved.await.unwrap_or_else(|late| Err(late.into())) {
            Ok(()) => {
                self.unsaved.clear();
                self.save_wait = EXPORT_POLL;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?self.save_wait, "cannot save the audit export cursors (the events are written; after a restart they would be written again)");
                self.next_save = tokio::time::Instant::now() + self.save_wait;
                self.save_wait = next_retry_wait(self.save_wait);
            }
        }
    }
}

async fn export_pending(
    app: &App,
    consumer: &str,
    sink: &SinkThread,
    stall: &mut Stall,
    progress: &mut ExportProgress,
) -> anyhow::Result<()> {
    let store = app.store().as_ref();
    // Each store call under the export's step deadline: abandoned, it changed nothing (reads),
    // and the next pass reads again. (The log's own writes have their stall report instead.)
    let step = BackgroundJob::AuditExport;
    for (tenant, head, head_hash) in crate::jobs::bounded(app, step, store.audit_heads()).await?? {
        let cursor = progress.cursors.entry(tenant).or_default();
        let holds = still_holds(store, tenant, cursor, head, head_hash);
        if !crate::jobs::bounded(app, step, holds).await?? {
            let back = go_back_to(store, tenant, cursor, head, head_hash);
            let (seq, hash) = crate::jobs::bounded(app, step, back).await??;
            tracing::warn!(
                tenant.id = %tenant,
                export.seq = cursor.seq,
                chain.head = head,
                export.from = seq,
                "the audit chain no longer holds the events the export wrote (a failover or a restore lost them?): exporting again from where it still does"
            );
            report_behind(app, tenant, cursor.seq, head);
            cursor.written.retain(|(at, _)| *at < seq);
            (cursor.seq, cursor.hash) = (seq, Some(hash));
            progress.unsaved.insert(tenant, seq);
        }
        while cursor.seq < head {
            let query = AuditQuery::after_seq(tenant, cursor.seq, EXPORT_BATCH);
            let events = crate::jobs::bounded(app, step, store.list_audit_events(&query)).await??;
            let (Some(first), Some(last)) = (events.first(), events.last()) else {
                break;
            };
            if first.seq > cursor.seq.saturating_add(1) {
                report_missing(app, consumer, tenant, cursor.seq, first.seq);
            }
            let mut lines = Vec::with_capacity(events.len() * 512);
            for event in &events {
                serde_json::to_writer(&mut lines, &crate::aether::AuditEventView::from(event))?;
                lines.push(b'\n');
            }
            sink.run(stall, move |sink| match sink {
                Some(sink) => sink.write_durably(&lines),
                None => Err(std::io::Error::other("the audit log is not open")),
            })
            .await?;
            // Written: the cursor moves now, whether or not its save succeeds, so a failing save
            // does not write the same lines again at every poll.
            cursor.advance(last.seq, last.chain_hash);
            progress.unsaved.insert(tenant, last.seq);
        }
        // Where the log now ends for this tenant (moved, gone back, or first read from the
        // store after a start).
        if let (Some(record), Some(hash)) = (&mut progress.heads, cursor.hash) {
            record.moved(tenant, cursor.seq, hash);
        }
    }
    progress.write_heads(sink, stall).await;
    progress.save(app, consumer).await;
    Ok(())
}

/// Whether the store's chain (`chain`: its head and hash, `None` when it holds no event of the
/// tenant) is behind what the audit log holds, `seq` with `hash`: its head is below it, or the
/// event there is another. An event pruned by retention is taken to be the one written.
async fn went_back(
    store: &dyn Store,
    tenant: TenantId,
    chain: Option<(u64, [u8; 32])>,
    seq: u64,
    hash: [u8; 32],
) -> Result<bool, keyplane_store::StoreError> {
    let Some((head, head_hash)) = chain else {
        return Ok(seq > 0);
    };
    Ok(match head.cmp(&seq) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Equal => head_hash != hash,
        std::cmp::Ordering::Greater => event_hash_at(store, tenant, seq)
            .await?
            .is_some_and(|found| found != hash),
    })
}

/// Records for `/readyz` and `/metrics` that the tenant's chain in the store was found behind the
/// audit log (which holds it up to `exported_seq`).
fn report_behind(app: &App, tenant: TenantId, exported_seq: u64, store_seq: u64) {
    let inner = app.inner();
    let count = inner.export_behind.record(crate::export_heads::Behind {
        tenant,
        exported_seq,
        store_seq,
        noticed_at: crate::ops::now(),
    });
    inner.metrics.audit_export_behind(count);
}

/// Records for `/readyz` and `/metrics` that the tenant's events after `exported_seq` and before
/// `next_seq` were gone from the store before the export wrote them (`export_gaps`).
fn report_missing(app: &App, consumer: &str, tenant: TenantId, exported_seq: u64, next_seq: u64) {
    let inner = app.inner();
    let missing = inner
        .export_gaps
        .record(tenant, exported_seq, next_seq, crate::ops::now());
    inner.metrics.audit_export_missed(missing);
    tracing::error!(tenant.id = %tenant, export.seq = exported_seq, chain.next = next_seq, missing, audit_log = %consumer, "audit events missing from the audit log: organization {tenant}'s events after seq {exported_seq} and before seq {next_seq} were gone from the store before this export wrote them (pruned by retention on a replica without this --audit-log, or before the export was configured?); neither holds them any more; exporting on from seq {next_seq}");
}

/// Whether the (file) audit log is empty: new, or emptied.
fn log_is_empty(target: &AuditLogTarget) -> bool {
    match target {
        AuditLogTarget::Stdout => false,
        AuditLogTarget::File(path) => {
            std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0)
        }
    }
}

/// Whether the tenant's chain still holds, at the cursor, the event the export wrote there. Read
/// from the store only when there are events to export after it (they are read anyway).
async fn still_holds(
    store: &dyn Store,
    tenant: TenantId,
    cursor: &mut ExportCursor,
    head: u64,
    head_hash: [u8; 32],
) -> Result<bool, keyplane_store::StoreError> {
    if cursor.seq > head {
        return Ok(false);
    }
    let found = if cursor.seq == head {
        Some(head_hash)
    } else {
        event_hash_at(store, tenant, cursor.seq).await?
    };
    Ok(match (found, cursor.hash) {
        (Some(found), Some(written)) => found == written,
        (Some(found), None) => {
            cursor.hash = Some(found);
            true
        }
        // Pruned by retention: nothing to compare with; the events after it are still there (or,
        // pruned past the cursor by a replica without this export, reported as missing).
        (None, _) => true,
    })
}

/// The newest position written that the chain still holds (an earlier checkpoint whose event has
/// the same hash), else the chain's anchor: everything after it is exported again.
async fn go_back_to(
    store: &dyn Store,
    tenant: TenantId,
    cursor: &ExportCursor,
    head: u64,
    head_hash: [u8; 32],
) -> Result<(u64, [u8; 32]), keyplane_store::StoreError> {
    for &(seq, hash) in cursor.written.iter().rev().filter(|(seq, _)| *seq <= head) {
        let found = if seq == head {
            Some(head_hash)
        } else {
            event_hash_at(store, tenant, seq).await?
        };
        if found == Some(hash) {
            return Ok((seq, hash));
        }
    }
    let state = store.audit_chain_state(tenant).await?;
    Ok((state.anchor_seq, state.anchor_hash))
}

/// The chain hash of the tenant's event at `seq` (the genesis hash at 0); `None` when the chain
/// holds no event there (pruned, or past its head).
pub(crate) async fn event_hash_at(
    store: &dyn Store,
    tenant: TenantId,
    seq: u64,
) -> Result<Option<[u8; 32]>, keyplane_store::StoreError> {
    let Some(before) = seq.checked_sub(1) else {
        return Ok(Some(keyplane_core::audit::GENESIS));
    };
    let events = store
        .list_audit_events(&AuditQuery::after_seq(tenant, before, 1))
        .await?;
    Ok(events
        .first()
        .filter(|e| e.seq == seq)
        .map(|e| e.chain_hash))
}

/// Rows per pruning transaction, and the pause between batches, so pruning never holds the store.
const PRUNE_BATCH: u32 = 1000;
const PRUNE_PAUSE: Duration = Duration::from_millis(50);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How soon retention held by the clock check asks again.
const HELD_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Deletes events older than `days` days, in bounded batches, at start and then hourly. With an
/// `--audit-log` export, only events it has written (its saved cursor, per organization): the
/// export is the archive, and a log that cannot be written to for longer than the retention
/// would otherwise lose them from both.
pub(crate) async fn retention(app: App, days: u32, mut stop: tokio::sync::watch::Receiver<bool>) {
    let exported_by = app
        .inner()
        .config
        .audit_log
        .as_ref()
        .map(AuditLogTarget::consumer);
    loop {
        // Not while this replica's clock is off by more than an hour (`ClockJob::AuditRetention`):
        // a clock ahead would delete events still within the retention. Asked again soon rather
        // than in an hour.
        if !app
            .inner()
            .clock_check
            .allows(&app, crate::clock_check::ClockJob::AuditRetention)
            .await
        {
            tokio::select! {
                _ = tokio::time::sleep(HELD_RETRY) => continue,
                _ = stop.changed() => return,
            }
        }
        // `None`: nothing can be that old, so there is nothing to prune.
        // By the clock the check measured (the same but in tests, which move it).
        let cutoff = retention_cutoff(app.now(), days);
        if let Some(cutoff) = cutoff {
            let record = crate::ops::audit_pruned(cutoff, days);
            loop {
                let batch = crate::jobs::bounded(
                    &app,
                    BackgroundJob::AuditRetention,
                    app.store().prune_audit_events(
                        cutoff,
                        PRUNE_BATCH,
                        exported_by.as_deref(),
                        &record,
                    ),
                );
                match batch.await.unwrap_or_else(|late| Err(late.into())) {
                    Ok(0) => break,
                    Ok(deleted) => tracing::info!(deleted, "pruned audit events"),
                    Err(error) => {
                        tracing::warn!(%error, "cannot prune audit events");
                        break;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_PAUSE) => {}
                    _ = stop.changed() => return,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// `now` less `days` days; `None` when that is before the earliest time chrono can hold (a panic,
/// with `-`, that would silently end the retention task).
fn retention_cutoff(
    now: chrono::DateTime<chrono::Utc>,
    days: u32,
) -> Option<chrono::DateTime<chrono::Utc>> {
    now.checked_sub_signed(chrono::TimeDelta::try_days(i64::from(days))?)
}

/// Flushes aggregated refusals (and the canary triggers organizations' budgets left out) every
/// `window` until `stop`, then once more.
pub(crate) async fn flush_refusals(
    app: App,
    window: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(window) => false,
            _ = stop.changed() => true,
        };
        let inner = app.inner();
        inner.refusals.flush(&app, stopping).await;
        inner.verifier.canaries().flush_left_out(stopping).await;
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod export_and_retention_tests {
    use super::*;

    #[test]
    fn reopening_backs_off_to_thirty_seconds() {
        let waits: Vec<u64> =
            std::iter::successors(Some(EXPORT_POLL), |w| Some(next_retry_wait(*w)))
                .take(11)
                .map(|w| w.as_millis() as u64)
                .collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000, 30_000]
        );
    }

    #[test]
    fn no_retention_panics_its_cutoff() {
        let now = crate::ops::now();
        assert_eq!(retention_cutoff(now, u32::MAX), None);
        assert_eq!(
            retention_cutoff(now, 400),
            Some(now - chrono::TimeDelta::days(400))
        );
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    /// One refusal of `actor` in `tenant`, as `after_response` records it.
    fn refusal(tenant: TenantId, actor: uuid::Uuid) -> (RefusalKey, AuditEvent) {
        let key = RefusalKey {
            tenant,
            actor: Some(actor),
            attempted: "introspect".into(),
            target: Some(actor),
        };
        let event = AuditEvent::new(
            uuid::Uuid::now_v7(),
            tenant,
            crate::ops::now(),
            actions::ACCESS_DENIED,
            AuditActor {
                actor_type: ActorType::ApiToken,
                id: Some(actor),
                issuer: None,
                subject: None,
            },
            RequestContext::default(),
        )
        .denied()
        .text("attempted", "introspect");
        (key, event)
    }

    fn add(pending: &mut Pending, tenant: TenantId, metrics: &crate::metrics::Metrics) {
        let (key, event) = refusal(tenant, uuid::Uuid::new_v4());
        pending.add(key, event, 1, metrics);
    }

    fn of(pending: &Pending, tenant: TenantId) -> Vec<(&RefusalKey, u64)> {
        pending
            .events
            .iter()
            .filter(|(key, _)| key.tenant == tenant)
            .map(|(key, (_, count))| (key, *count))
            .collect()
    }

    fn dropped(metrics: &crate::metrics::Metrics) -> String {
        metrics
            .render()
            .lines()
            .find(|line| line.starts_with("keyplane_audit_refusals_dropped"))
            .unwrap_or_default()
            .to_string()
    }

    /// One tenant refused under as many actors as the queue holds (its own expired tokens,
    /// introspected one by one) keeps a bounded number of keys, its count whole; another tenant
    /// refused afterwards gets its own.
    #[test]
    fn one_tenant_cannot_fill_the_queue_for_the_others() {
        let metrics = crate::metrics::Metrics::new();
        let mut pending = Pending::default();
        let (hog, other) = (TenantId::new(), TenantId::new());
        for _ in 0..MAX_PENDING {
            add(&mut pending, hog, &metrics);
        }
        let (key, event) = refusal(other, uuid::Uuid::new_v4());
        pending.add(key.clone(), event, 1, &metrics);
        assert_eq!(pending.events.get(&key).map(|(_, count)| *count), Some(1));

        let hogs = of(&pending, hog);
        assert_eq!(hogs.len(), MAX_KEYS_PER_TENANT);
        let total: u64 = hogs.iter().map(|(_, count)| count).sum();
        assert_eq!(total, MAX_PENDING as u64, "every refusal counted");
        let (folded, count) = hogs
            .iter()
            .find(|(key, _)| key.actor.is_none())
            .expect("the tenant's (various)");
        assert_eq!(folded.attempted, "(various)");
        assert_eq!(
            *count,
            (MAX_PENDING - (MAX_KEYS_PER_TENANT - 1)) as u64,
            "each actor past the tenant's keys folded into one"
        );
        let (event, _) = &pending.events[*folded];
        assert_eq!(event.actor, AuditActor::system());
        assert_eq!(event.context, RequestContext::default());
        assert!(dropped(&metrics).ends_with(" 0"), "{}", dropped(&metrics));
    }

    /// Many tenants at once: past [`SHARED_PENDING`] each tenant's first refusal still gets its
    /// key and the rest fold into one per tenant; only past [`MAX_PENDING`] is anything dropped.
    #[test]
    fn a_crowded_queue_keeps_room_for_each_tenants_first_refusal() {
        let metrics = crate::metrics::Metrics::new();
        let mut pending = Pending::default();
        let tenants: Vec<TenantId> = (0..SHARED_PENDING / MAX_KEYS_PER_TENANT + 1)
            .map(|_| TenantId::new())
            .collect();
        for tenant in &tenants {
            for _ in 0..MAX_KEYS_PER_TENANT * 2 {
                add(&mut pending, *tenant, &metrics);
            }
        }
        assert!(pending.events.len() >= SHARED_PENDING);
        let late = TenantId::new();
        for _ in 0..5 {
            add(&mut pending, late, &metrics);
        }
        let lates = of(&pending, late);
        assert_eq!(lates.len(), 2, "its first refusal, and one for the rest");
        assert!(lates
            .iter()
            .any(|(key, count)| key.actor.is_none() && *count == 4));
        assert!(dropped(&metrics).ends_with(" 0"), "{}", dropped(&metrics));

        // A store flush puts back what it could not write, in any order, within the bounds: no
        // more keys, the same counts.
        let drained: Vec<_> = pending.events.drain().collect();
        pending.keys_per_tenant.clear();
        let before: u64 = drained.iter().map(|(_, (_, count))| count).sum();
        let keys = drained.len();
        for (key, (event, count)) in drained {
            pending.add(key, event, count, &metrics);
        }
        assert!(pending.events.len() <= keys);
        let after: u64 = pending.events.values().map(|(_, count)| count).sum();
        assert_eq!(after, before);
        assert!(dropped(&metrics).ends_with(" 0"), "{}", dropped(&metrics));
    }
}
