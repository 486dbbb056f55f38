//! Creating a tenant under a name no live one has (`admin create-org`), and deleting a tenant
//! (`admin delete-org`): its tombstone, what it holds, and the purge. Shared by both backends
//! through [`impl_tenant_purge!`], like [`crate::sql`].

/// The first created live tenant named `$1` (a deleted one's name is free again).
pub(crate) const SELECT_LIVE_TENANT_NAMED: &str = "SELECT id, name, created_at FROM tenants \
     WHERE name = $1 AND deleted_at IS NULL ORDER BY created_at, id LIMIT 1";

/// The tenant, deleted or not.
pub(crate) const SELECT_TENANT_RECORD: &str =
    "SELECT id, name, created_at, deleted_at FROM tenants WHERE id = $1";
pub(crate) const COUNT_CREDENTIALS: &str = "SELECT COUNT(*) FROM credentials WHERE tenant_id = $1";
pub(crate) const COUNT_LIVE_CREDENTIALS: &str =
    "SELECT COUNT(*) FROM credentials WHERE tenant_id = $1 AND revoked_at IS NULL";
pub(crate) const COUNT_GRANTS: &str = "SELECT COUNT(*) FROM grants WHERE tenant_id = $1";
pub(crate) const COUNT_LIVE_GRANTS: &str =
    "SELECT COUNT(*) FROM grants WHERE tenant_id = $1 AND revoked_at IS NULL";
pub(crate) const COUNT_WEBHOOKS: &str = "SELECT COUNT(*) FROM webhooks WHERE tenant_id = $1";
pub(crate) const COUNT_CONSOLE_SESSIONS: &str =
    "SELECT COUNT(*) FROM console_sessions WHERE tenant_id = $1";
pub(crate) const COUNT_IDEMPOTENCY_RECORDS: &str =
    "SELECT COUNT(*) FROM idempotency_keys WHERE tenant_id = $1";
pub(crate) const COUNT_CREDENTIAL_POLICIES: &str =
    "SELECT COUNT(*) FROM credential_policies WHERE tenant_id = $1";
pub(crate) const COUNT_AUDIT_EVENTS: &str =
    "SELECT COUNT(*) FROM audit_events WHERE tenant_id = $1";
/// A batch of the tenant's revoked credentials (a live one stays: the final step refuses it).
pub(crate) const DELETE_REVOKED_CREDENTIALS: &str = "DELETE FROM credentials WHERE id IN \
     (SELECT id FROM credentials WHERE tenant_id = $1 AND revoked_at IS NOT NULL ORDER BY id LIMIT $2)";
pub(crate) const DELETE_REVOKED_GRANTS: &str = "DELETE FROM grants WHERE id IN \
     (SELECT id FROM grants WHERE tenant_id = $1 AND revoked_at IS NOT NULL ORDER BY id LIMIT $2)";
/// The final transaction's first statement: it takes the tenant's row, which migration 0020's
/// triggers read FOR SHARE with any insert of the tenant's (0023: on `credentials`, once at the
/// end of the statement), so no insert commits between the checks that follow and the commit.
pub(crate) const MARK_TENANT_DELETED: &str =
    "UPDATE tenants SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL";
pub(crate) const DELETE_CREDENTIALS: &str = "DELETE FROM credentials WHERE tenant_id = $1";
pub(crate) const DELETE_GRANTS: &str = "DELETE FROM grants WHERE tenant_id = $1";
pub(crate) const WEBHOOK_IDS: &str = "SELECT id FROM webhooks WHERE tenant_id = $1 ORDER BY id";
/// Its patterns and deliveries go with it (ON DELETE CASCADE).
pub(crate) const DELETE_WEBHOOK: &str = "DELETE FROM webhooks WHERE tenant_id = $1 AND id = $2";
/// Their sealed secrets go with them (ON DELETE CASCADE).
pub(crate) const DELETE_CONSOLE_SESSIONS: &str =
    "DELETE FROM console_sessions WHERE tenant_id = $1";
pub(crate) const DELETE_IDEMPOTENCY_RECORDS: &str =
    "DELETE FROM idempotency_keys WHERE tenant_id = $1";
pub(crate) const DELETE_CREDENTIAL_POLICIES: &str =
    "DELETE FROM credential_policies WHERE tenant_id = $1";

#[derive(sqlx::FromRow)]
pub(crate) struct TenantRecordRow {
    id: uuid::Uuid,
    name: String,
    created_at: chrono::DateTime<chrono::Utc>,
    deleted_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<TenantRecordRow> for crate::TenantRecord {
    fn from(row: TenantRecordRow) -> Self {
        crate::TenantRecord {
            tenant: keyplane_core::Tenant {
                id: keyplane_core::TenantId::from_uuid(row.id),
                name: row.name,
                created_at: row.created_at,
            },
            deleted_at: row.deleted_at,
        }
    }
}

/// Implements the tenant creation and deletion helpers the [`crate::Store`] methods of `$store`
/// (over `$db`) call.
macro_rules! impl_tenant_purge {
    ($store:ty, $db:ty) => {
        impl $store {
            async fn tenant_create(
                &self,
                new: &$crate::NewTenant<'_>,
            ) -> Result<$crate::TenantCreated, $crate::StoreError> {
                let outcome = self.write_if(
                    async {
                        // Immediate on SQLite: the check and the insert under one write lock
                        // (a deferred transaction would read, then fail to write once another
                        // process had written).
                        let mut tx = self.writer.begin_with(Self::BEGIN_WRITE).await?;
                        if new.unique_name {
                            // Names are not unique in the schema (organizations named alike
                            // before the check existed stay valid), so creations of one name
                            // take turns instead.
                            Self::lock_tenant_name(&mut tx, &new.tenant.name).await?;
                            let named: Option<$crate::rows::TenantRow> =
                                sqlx::query_as($crate::tenants::SELECT_LIVE_TENANT_NAMED)
                                    .bind(&new.tenant.name)
                                    .fetch_optional(&mut *tx)
                                    .await?;
                            if let Some(named) = named {
                                return Ok($crate::TenantCreated::NameTaken(named.into()));
                            }
                        }
                        Self::insert_tenant(&mut tx, new.tenant).await?;
                        if let Some(credential) = new.credential {
                            bind_credential(
                                sqlx::query($crate::sql::INSERT_CREDENTIAL),
                                credential,
                            )
                            .execute(&mut *tx)
                            .await?;
                        }
                        for event in new.events {
                            Self::append_audit(&mut tx, event).await?;
                        }
                        tx.commit().await?;
                        Ok($crate::TenantCreated::Created)
                    },
                    |created| *created == $crate::TenantCreated::Created,
                );
                outcome.await
            }

            async fn count_of(
                executor: impl sqlx::Executor<'_, Database = $db>,
                sql: &str,
                tenant: keyplane_core::TenantId,
            ) -> Result<u64, $crate::StoreError> {
                let (count,): (i64,) = sqlx::query_as(sql)
                    .bind(tenant.as_uuid())
                    .fetch_one(executor)
                    .await?;
                Ok(u64::try_from(count).unwrap_or(0))
            }

            async fn tenant_record(
                &self,
                id: keyplane_core::TenantId,
            ) -> Result<Option<$crate::TenantRecord>, $crate::StoreError> {
                let row: Option<$crate::tenants::TenantRecordRow> =
                    sqlx::query_as($crate::tenants::SELECT_TENANT_RECORD)
                        .bind(id.as_uuid())
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(Into::into))
            }

            async fn tenant_rows(
                &self,
                id: keyplane_core::TenantId,
            ) -> Result<$crate::TenantRows, $crate::StoreError> {
                use $crate::tenants::*;
                // One read transaction: the counts agree with each other.
                let mut tx = self.pool.begin().await?;
                let rows = $crate::TenantRows {
                    credentials: Self::count_of(&mut *tx, COUNT_CREDENTIALS, id).await?,
                    grants: Self::count_of(&mut *tx, COUNT_GRANTS, id).await?,
                    webhooks: Self::count_of(&mut *tx, COUNT_WEBHOOKS, id).await?,
                    console_sessions: Self::count_of(&mut *tx, COUNT_CONSOLE_SESSIONS, id).await?,
                    idempotency_records: Self::count_of(&mut *tx, COUNT_IDEMPOTENCY_RECORDS, id)
                        .await?,
                    credential_policies: Self::count_of(&mut *tx, COUNT_CREDENTIAL_POLICIES, id)
                        .await?,
                    audit_events: Self::count_of(&mut *tx, COUNT_AUDIT_EVENTS, id).await?,
                };
                tx.rollback().await?;
                Ok(rows)
            }

            /// Deletes up to `batch` rows with `sql` (`$1` the tenant, `$2` the limit) in a
            /// transaction of its own, until none is left; returns how many.
            async fn delete_in_batches(
                &self,
                sql: &str,
                tenant: keyplane_core::TenantId,
                batch: u32,
            ) -> Result<u64, $crate::StoreError> {
                let mut deleted = 0;
                loop {
                    let done = self
                        .write_if(
                            async {
                                Ok(sqlx::query(sql)
                                    .bind(tenant.as_uuid())
                                    .bind(i64::from(batch.max(1)))
                                    .execute(&self.writer)
                                    .await?
                                    .rows_affected())
                            },
                            |n| *n > 0,
                        )
                        .await?;
                    deleted += done;
                    if done < u64::from(batch.max(1)) {
                        return Ok(deleted);
                    }
                }
            }

            async fn tenant_purge(
                &self,
                id: keyplane_core::TenantId,
                at: chrono::DateTime<chrono::Utc>,
                batch: u32,
                deleted: $crate::EventOf<'_, $crate::TenantRows>,
            ) -> Result<Option<$crate::TenantRows>, $crate::StoreError> {
                use $crate::tenants::*;
                if self.tenant_record(id).await?.is_none() {
                    return Err($crate::StoreError::NotFound);
                }
                // The bulk first, a batch a transaction: neither a long lock nor a huge
                // transaction, however many rows the tenant has.
                let mut rows = $crate::TenantRows {
                    credentials: self
                        .delete_in_batches(DELETE_REVOKED_CREDENTIALS, id, batch)
                        .await?,
                    grants: self
                        .delete_in_batches(DELETE_REVOKED_GRANTS, id, batch)
                        .await?,
                    ..Default::default()
                };
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    let marked = sqlx::query(MARK_TENANT_DELETED)
                        .bind(id.as_uuid())
                        .bind(at)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if marked == 0 {
                        // Another run deleted it meanwhile.
                        return Ok(None);
                    }
                    let live = Self::count_of(&mut *tx, COUNT_LIVE_CREDENTIALS, id).await?
                        + Self::count_of(&mut *tx, COUNT_LIVE_GRANTS, id).await?;
                    if live > 0 {
                        return Err($crate::StoreError::Conflict(format!(
                            "{live} credential(s) or authorization(s) of the organization are \
                             live again (created while it was being deleted): run it again"
                        )));
                    }
                    // The head before the webhooks' rows and deliveries, as a webhook's delete
                    // takes them.
                    Self::lock_audit_head(&mut tx, id).await?;
                    for (sql, count) in [
                        (DELETE_CREDENTIALS, &mut rows.credentials),
                        (DELETE_GRANTS, &mut rows.grants),
                    ] {
                        *count += sqlx::query(sql)
                            .bind(id.as_uuid())
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                    }
                    // Leftovers: a webhook created after its organization's were deleted.
                    let webhooks: Vec<(uuid::Uuid,)> = sqlx::query_as(WEBHOOK_IDS)
                        .bind(id.as_uuid())
                        .fetch_all(&mut *tx)
                        .await?;
                    for (webhook,) in webhooks {
                        Self::lock_webhook_deliveries(&mut tx, id, webhook).await?;
                        rows.webhooks += sqlx::query(DELETE_WEBHOOK)
                            .bind(id.as_uuid())
                            .bind(webhook)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                    }
                    for (sql, count) in [
                        (DELETE_CONSOLE_SESSIONS, &mut rows.console_sessions),
                        (DELETE_IDEMPOTENCY_RECORDS, &mut rows.idempotency_records),
                        (DELETE_CREDENTIAL_POLICIES, &mut rows.credential_policies),
                    ] {
                        *count = sqlx::query(sql)
                            .bind(id.as_uuid())
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                    }
                    // A store whose every tenant is deleted is not a new one: `serve` must not
                    // bootstrap a `default` organization with a `*` token into it.
                    sqlx::query($crate::sql::CLAIM_BOOTSTRAP)
                        .bind(at.to_rfc3339())
                        .execute(&mut *tx)
                        .await?;
                    rows.audit_events = Self::count_of(&mut *tx, COUNT_AUDIT_EVENTS, id).await?;
                    Self::append_audit(&mut tx, &deleted(&rows)).await?;
                    tx.commit().await?;
                    Ok(Some(rows))
                })
                .await
            }
        }
    };
}

pub(crate) use impl_tenant_purge;
