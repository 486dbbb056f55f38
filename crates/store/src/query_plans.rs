//! The plans of the queries that run against tables which grow without bound (deliveries, the
//! audit trail, credentials): each must reach its rows through the index made for it, not read
//! the rows it does not return. The SQL is the stores' own, so these run in the crate.
//!
//! PostgreSQL plans by statistics: it explains each over a tenant with thousands of rows (as the
//! queries are for), analyzed, and with `enable_seqscan` off. SQLite's planner is deterministic
//! as it is, on empty tables.

use crate::testing::{Backend, TestDatabase};
use crate::{AuditOrder, AuditQuery, DeliveryQuery, ExpiryWindow, ListCredentials};
use crate::{PostgresStore, SqliteStore};
use chrono::{DateTime, TimeDelta, Utc};
use keyplane_core::{CredentialKind, TenantId};
use sqlx::{Arguments, Connection, Execute, Postgres, QueryBuilder, Sqlite};
use uuid::Uuid;

/// A bind parameter of a query given as text.
#[derive(Clone, Copy)]
enum Arg {
    Int(i64),
    Id(Uuid),
    Time(DateTime<Utc>),
    Text(&'static str),
}

/// One query on both backends, and the index that must serve it.
struct Planned {
    what: String,
    postgres: QueryBuilder<'static, Postgres>,
    sqlite: QueryBuilder<'static, Sqlite>,
    /// The index, or any of them when `|`-separated.
    index: String,
    /// Read in the index's order: no sort of the rows read.
    in_order: bool,
}

impl Planned {
    fn built(
        what: impl Into<String>,
        postgres: QueryBuilder<'static, Postgres>,
        sqlite: QueryBuilder<'static, Sqlite>,
        index: impl Into<String>,
        in_order: bool,
    ) -> Self {
        Self {
            what: what.into(),
            postgres,
            sqlite,
            index: index.into(),
            in_order,
        }
    }

    /// `sql` with `args` bound to its `$1`, `$2`, ... in order.
    fn sql(
        what: impl Into<String>,
        sql: &str,
        args: &[Arg],
        index: impl Into<String>,
        in_order: bool,
    ) -> Self {
        Self::sql_each(what, sql, sql, args, index, in_order)
    }

    /// [`Planned::sql`] for a statement each backend spells its own way.
    fn sql_each(
        what: impl Into<String>,
        postgres: &str,
        sqlite: &str,
        args: &[Arg],
        index: impl Into<String>,
        in_order: bool,
    ) -> Self {
        macro_rules! bound {
            ($arguments:ty, $sql:expr) => {{
                let mut arguments = <$arguments>::default();
                for arg in args {
                    match *arg {
                        Arg::Int(v) => arguments.add(v),
                        Arg::Id(v) => arguments.add(v),
                        Arg::Time(v) => arguments.add(v),
                        Arg::Text(v) => arguments.add(v),
                    }
                    .expect("encode an argument");
                }
                QueryBuilder::with_arguments($sql, arguments)
            }};
        }
        Self::built(
            what,
            bound!(sqlx::postgres::PgArguments, postgres),
            bound!(sqlx::sqlite::SqliteArguments<'static>, sqlite),
            index,
            in_order,
        )
    }
}

/// The tenant's newest events, unfiltered.
fn audit(tenant_id: TenantId) -> AuditQuery {
    AuditQuery {
        order: AuditOrder::NewestBefore(None),
        ..AuditQuery::after_seq(tenant_id, 0, 51)
    }
}

/// Every query this module checks, with the index it must use: of the tenant `tenant`, and of
/// the webhook, target, actor `id`.
fn planned(tenant: TenantId, id: Uuid) -> Vec<Planned> {
    let both = |what: &str, query: &AuditQuery, index: &str| {
        Planned::built(
            what,
            PostgresStore::audit_query(query),
            SqliteStore::audit_query(query),
            index,
            // The few rows of a filter may be sorted; the index yields many in order.
            false,
        )
    };
    let mut all = vec![
        both(
            "audit events of a target",
            &AuditQuery {
                target_id: Some(id),
                ..audit(tenant)
            },
            "audit_events_by_target",
        ),
        both(
            "audit events of a target, next page",
            &AuditQuery {
                target_id: Some(id),
                order: AuditOrder::NewestBefore(Some(Uuid::now_v7())),
                ..audit(tenant)
            },
            "audit_events_by_target",
        ),
        both(
            "audit events of an actor",
            &AuditQuery {
                actor_id: Some(id),
                ..audit(tenant)
            },
            "audit_events_by_actor",
        ),
        both(
            "audit events of an action",
            &AuditQuery {
                actions: vec![keyplane_core::audit::actions::API_TOKEN_CREATED.into()],
                ..audit(tenant)
            },
            "audit_events_by_action",
        ),
    ];
    let recent = AuditQuery {
        since: Some(Utc::now() - TimeDelta::hours(1)),
        until: Some(Utc::now()),
        ..audit(tenant)
    };
    // Read by time, then sorted by seq: the rows of the window only. PostgreSQL may read the
    // window of all tenants by the prune's index instead (still the window only); SQLite, without
    // statistics, would walk the tenant's chain by the primary key but for the tenant's own.
    all.push(Planned::built(
        "audit events of a time window",
        PostgresStore::audit_query(&recent),
        SqliteStore::audit_query(&recent),
        "audit_events_by_time|audit_events_age",
        false,
    ));
    let expiring = ListCredentials {
        tenant_id: tenant,
        kind: CredentialKind::ApiToken,
        after: None,
        limit: Some(51),
        include_revoked: false,
        expiring: Some(ExpiryWindow {
            after: Utc::now(),
            until: Utc::now() + TimeDelta::days(7),
        }),
        include_canaries: false,
    };
    all.push(Planned::built(
        "credentials expiring within days",
        PostgresStore::credential_list_query(&expiring),
        SqliteStore::credential_list_query(&expiring),
        "credentials_expiring",
        false,
    ));
    for stage in std::iter::once(0).chain(keyplane_core::policy::EXPIRY_WARNING_DAYS) {
        all.push(Planned::sql(
            format!("credentials to announce at {stage} days"),
            &crate::sql::expiry_notice_sql(stage),
            &[Arg::Time(Utc::now()), Arg::Int(100)],
            format!("credentials_expiry_stage_{stage}"),
            true,
        ));
    }
    all.extend([
        Planned::sql(
            "the grace period that ends first",
            &crate::sql::in_grace_sql(),
            &[Arg::Int(1)],
            "credentials_previous_secret_expiry",
            true,
        ),
        Planned::sql(
            "a page of previous secrets to retire when unused",
            &crate::sql::retiring_previous_sql(true),
            &[Arg::Int(100), Arg::Time(Utc::now()), Arg::Id(id)],
            "credentials_previous_secret_expiry",
            true,
        ),
        Planned::sql(
            "ended grace periods",
            crate::sql::ENDED_PREVIOUS_SECRETS,
            &[Arg::Time(Utc::now())],
            "credentials_previous_secret_expiry",
            false,
        ),
    ]);
    let by_status = DeliveryQuery {
        tenant_id: tenant,
        webhook_id: id,
        before: Some(Uuid::now_v7()),
        status: Some(keyplane_core::webhook::DeliveryStatus::Failed),
        limit: 51,
    };
    all.extend([Planned::sql_each(
        "a claim of due deliveries",
        &crate::webhooks::claim_deliveries_sql(PostgresStore::ROW_LOCK),
        &crate::webhooks::claim_deliveries_sql(SqliteStore::ROW_LOCK),
        // Every delivery due, as in a backlog.
        &[
            Arg::Int(1_000_100),
            Arg::Id(Uuid::now_v7()),
            Arg::Int(1_000_000),
            Arg::Int(64),
            Arg::Int(2),
            Arg::Int(16),
        ],
        "webhook_deliveries_pending",
        false,
    )]);
    // Read every few seconds by each replica: the pending rows only, however many finished ones
    // are kept.
    all.push(Planned::sql(
        "the webhook backlog",
        crate::webhooks::BACKLOG,
        &[],
        "webhook_deliveries_due|webhook_deliveries_pending",
        false,
    ));
    all.push(Planned::built(
        "a webhook's deliveries of a status",
        PostgresStore::delivery_query(&by_status, None),
        SqliteStore::delivery_query(&by_status, None),
        "webhook_deliveries_by_status",
        true,
    ));
    let last_listed = keyplane_core::Tenant {
        id: TenantId::new(),
        name: "org2500".into(),
        created_at: Utc::now() - TimeDelta::days(2),
    };
    // The few organizations of a name may be sorted; all of them are read in the index's order.
    for (what, page, index, in_order) in [
        (
            "organizations, first page",
            (None, None),
            "tenants_listing",
            true,
        ),
        (
            "organizations, next page",
            (None, Some(&last_listed)),
            "tenants_listing",
            true,
        ),
        (
            "organizations of a name, next page",
            (Some("org7"), Some(&last_listed)),
            "tenants_by_name",
            false,
        ),
    ] {
        let page = crate::TenantPage {
            name: page.0,
            after: page.1,
            limit: 500,
        };
        all.push(Planned::built(
            what,
            PostgresStore::tenant_list_query(&page),
            SqliteStore::tenant_list_query(&page),
            index,
            in_order,
        ));
    }
    all.push(Planned::sql(
        "the first live organization of a name",
        crate::tenants::SELECT_LIVE_TENANT_NAMED,
        &[Arg::Text("org7")],
        "tenants_by_name",
        true,
    ));
    all
}

/// Rows of the tenant `$1` as one that has been around for a while has them, and the webhook,
/// target and actor `$2` among others (both spelled into the text): 20,000 credentials, 10,000
/// audit events between 30,000 of other tenants, 20,000 deliveries over 50 webhooks; and 5,000
/// other organizations, one in ten deleted.
const POSTGRES_ROWS: &[&str] = &[
    "INSERT INTO tenants (id, name, created_at) VALUES ($1, 'plans', now())",
    "INSERT INTO tenants (id, name, created_at, deleted_at) \
     SELECT md5('org' || g)::uuid, 'org' || (g % 1000), now() - g * interval '1 minute', \
     CASE WHEN g % 10 = 0 THEN now() END FROM generate_series(1, 5000) g",
    "INSERT INTO credentials (id, tenant_id, kind, name, secret_hash, display_prefix, last4, scopes, \
     expires_at, created_at, updated_at, revoked_at, previous_secret_hash, previous_secret_expires_at, \
     expiry_notice_days) \
     SELECT gen_random_uuid(), $1, 'api_token', 'c' || g, decode(md5(g::text), 'hex'), 'kp_', 'abcd', '[]', \
     now() + g * interval '1 hour', now(), now(), CASE WHEN g % 10 = 0 THEN now() END, \
     CASE WHEN g % 100 = 0 THEN decode(md5('p' || g), 'hex') END, \
     CASE WHEN g % 100 = 0 THEN now() + g * interval '1 minute' END, \
     CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN 30 WHEN 2 THEN 7 ELSE 1 END \
     FROM generate_series(1, 20000) g",
    "INSERT INTO audit_events (tenant_id, seq, id, occurred_at, action, outcome, actor_type, actor_id, \
     target_type, target_id, details, chain_hash) \
     SELECT CASE WHEN g % 4 = 0 THEN $1 ELSE md5('other' || (g % 100))::uuid END, g, gen_random_uuid(), \
     now() - (40000 - g) * interval '15 seconds', 'action.' || (g % 40), \
     'success', 'api_token', CASE WHEN g % 200 = 0 THEN $2 ELSE md5('a' || (g % 200))::uuid END, \
     'api_token', CASE WHEN g % 2000 = 0 THEN $2 ELSE md5('t' || (g % 2000))::uuid END, '{}', '' \
     FROM generate_series(1, 40000) g",
    "INSERT INTO webhooks (id, tenant_id, url, events, description, enabled, secret, created_at, updated_at) \
     SELECT $2, $1, 'https://example.com/', '[]', '', TRUE, 'whsec_', now(), now() \
     UNION ALL SELECT md5('other' || g)::uuid, $1, 'https://example.com/', '[]', '', TRUE, 'whsec_', now(), now() \
     FROM generate_series(1, 49) g",
    "INSERT INTO webhook_deliveries (webhook_id, event_id, tenant_id, action, status, attempts, schedule_step, \
     created_ms, next_attempt_ms, locked_until_ms) \
     SELECT CASE WHEN g % 3 = 0 THEN $2 ELSE md5('other' || (g % 49 + 1))::uuid END, gen_random_uuid(), $1, 'action', \
     CASE g % 100 WHEN 0 THEN 'failed' WHEN 1 THEN 'pending' ELSE 'succeeded' END, \
     1, 1, g, g, 0 FROM generate_series(1, 20000) g",
];

/// What is wrong with the plan `plan` (one line a node) of `query`, if anything.
fn check(query: &Planned, backend: Backend, plan: &str) -> Option<String> {
    let uses = |index: &str| match backend {
        // "Index Scan using x", "Index Only Scan using x", "Bitmap Index Scan on x".
        Backend::Postgres => ["using", "on"].iter().any(|by| {
            plan.contains(&format!("{by} {index} ")) || plan.contains(&format!("{by} {index}\n"))
        }),
        Backend::Sqlite => {
            plan.contains(&format!("INDEX {index} ")) || plan.contains(&format!("INDEX {index}\n"))
        }
    };
    let uses_index = query.index.split('|').any(uses);
    let sorts = match backend {
        Backend::Postgres => plan.contains("Sort"),
        Backend::Sqlite => plan.contains("TEMP B-TREE"),
    };
    if !uses_index {
        Some(format!("{}: not by {}:\n{plan}", query.what, query.index))
    } else if query.in_order && sorts {
        Some(format!("{}: sorted:\n{plan}", query.what))
    } else {
        None
    }
}

async fn plans_use_their_indexes(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    // Migrated.
    crate::connect(&db.url).await.expect("connect");
    let mut wrong = Vec::new();
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let (tenant, id) = (TenantId::new(), Uuid::now_v7());
            for statement in POSTGRES_ROWS {
                let statement = statement
                    .replace("$1", &format!("'{tenant}'::uuid"))
                    .replace("$2", &format!("'{id}'::uuid"));
                sqlx::query(&statement)
                    .execute(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("{statement}: {e}"));
            }
            for statement in ["ANALYZE", "SET enable_seqscan = off"] {
                sqlx::query(statement).execute(&mut conn).await.unwrap();
            }
            for mut query in planned(tenant, id) {
                let mut built = query.postgres.build();
                let args = built.take_arguments().unwrap().unwrap_or_default();
                let sql = format!("EXPLAIN (COSTS OFF) {}", built.sql());
                let lines: Vec<(String,)> = sqlx::query_as_with(&sql, args)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", query.what));
                let plan: String = lines.into_iter().map(|(l,)| l + "\n").collect();
                wrong.extend(check(&query, backend, &plan));
            }
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            for mut query in planned(TenantId::new(), Uuid::now_v7()) {
                let mut built = query.sqlite.build();
                let args = built.take_arguments().unwrap().unwrap_or_default();
                let sql = format!("EXPLAIN QUERY PLAN {}", built.sql());
                let lines: Vec<(i64, i64, i64, String)> = sqlx::query_as_with(&sql, args)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", query.what));
                let plan: String = lines.into_iter().map(|(.., l)| l + "\n").collect();
                wrong.extend(check(&query, backend, &plan));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn sqlite_plans_use_their_indexes() {
    plans_use_their_indexes(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_plans_use_their_indexes() {
    plans_use_their_indexes(Backend::Postgres).await;
}
