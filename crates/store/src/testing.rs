//! Test support shared by every crate's tests (feature `testing`): a fresh, isolated database per
//! test on either backend, dropped when the test ends.
//!
//! PostgreSQL tests never skip: the admin URL comes from `KEYPLANE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), and an unreachable server fails the test with a
//! message that says how to start one.

use sqlx::{Connection, Executor, PgConnection};
use std::path::PathBuf;

pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test. `url` is what `serve --database-url` takes.
pub struct TestDatabase {
    pub url: String,
    /// For SQLite: the data directory, which also holds the database file.
    pub data_dir: PathBuf,
    _temp: tempfile::TempDir,
    postgres: Option<PostgresCleanup>,
}

struct PostgresCleanup {
    admin_url: String,
    name: String,
}

fn admin_url() -> String {
    std::env::var("KEYPLANE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_string())
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> Self {
        let temp = tempfile::Builder::new()
            .prefix("keyplane-test-")
            // Private, as `serve` requires of a data directory.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .expect("create a temporary directory");
        let data_dir = temp.path().to_path_buf();
        match backend {
            Backend::Sqlite => Self {
                url: crate::sqlite_url_for_data_dir(&data_dir),
                data_dir,
                _temp: temp,
                postgres: None,
            },
            Backend::Postgres => {
                let admin_url = admin_url();
                let name = format!("kp_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL is not reachable at {admin_url} ({e}). Start it \
                         (e.g. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) \
                         or set KEYPLANE_TEST_DATABASE_URL to a server where this user may CREATE DATABASE."
                    )
                });
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("create the per-test database");
                let url = replace_database(&admin_url, &name);
                Self {
                    url,
                    data_dir,
                    _temp: temp,
                    postgres: Some(PostgresCleanup { admin_url, name }),
                }
            }
        }
    }
}

/// The migration files of one backend, by version.
fn migration_files(backend: &str) -> std::collections::BTreeMap<i64, PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    std::fs::read_dir(&dir)
        .expect("read the migrations")
        .map(|entry| {
            let path = entry.expect("read the migrations").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let version = name.split('_').next().unwrap().parse().unwrap();
            (version, path)
        })
        .collect()
}

pub use crate::latest_schema;

/// Brings the new database at `url` to schema `version` only, as the keyplane release that
/// stopped at that migration left it: an older store to upgrade.
pub async fn migrate_to(url: &str, version: i64) {
    let backend = if url.starts_with("sqlite:") {
        "sqlite"
    } else {
        "postgres"
    };
    let older = tempfile::tempdir().expect("create a temporary directory");
    for (_, path) in migration_files(backend).range(..=version) {
        std::fs::copy(path, older.path().join(path.file_name().unwrap()))
            .expect("copy a migration");
    }
    let migrator = sqlx::migrate::Migrator::new(older.path())
        .await
        .expect("read the older migrations");
    if backend == "sqlite" {
        use std::os::unix::fs::OpenOptionsExt;
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("a SQLite URL");
        // Private, as keyplane creates it (and refuses it otherwise).
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(options.get_filename())
            .expect("create the database");
        let pool = sqlx::SqlitePool::connect_with(options.create_if_missing(true))
            .await
            .expect("open the database");
        migrator.run(&pool).await.expect("migrate");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("open the database");
        migrator.run(&pool).await.expect("migrate");
        pool.close().await;
    }
}

/// The highest migration the database at `url` ran.
pub async fn schema_version(url: &str) -> i64 {
    let sql = "SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url)
            .await
            .expect("open the database");
        let version = sqlx::query_scalar(sql).fetch_one(&pool).await;
        pool.close().await;
        version.expect("read the schema version")
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("open the database");
        let version = sqlx::query_scalar(sql).fetch_one(&pool).await;
        pool.close().await;
        version.expect("read the schema version")
    }
}

/// `postgres://u@h:p/db?x` with `db` replaced.
fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(cleanup) = self.postgres.take() else {
            return;
        };
        // Drop runs inside or outside a runtime; a thread with its own runtime works in both.
        let result = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a cleanup runtime");
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&cleanup.admin_url).await?;
                admin
                    .execute(
                        format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", cleanup.name).as_str(),
                    )
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if let Ok(Err(e)) = result {
            eprintln!("warning: could not drop a test database: {e}");
        }
    }
}

/// Every connection of `store`'s general readers, taken and held until the returned connections
/// are dropped: what slow queries occupying them all would leave the rest of the server (SQLite
/// has no lock that holds a WAL reader, so a test takes them itself).
pub async fn hold_general_readers(
    store: &crate::SqliteStore,
) -> Vec<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
    hold_all(store.general_readers()).await
}

/// A store whose verification connections (`verification.rs`) a test can take.
pub trait VerificationReaders {
    type Database: sqlx::Database;

    fn verification_readers(&self) -> &sqlx::Pool<Self::Database>;
}

/// Every connection of `store`'s verification pool, taken and held until the returned
/// connections are dropped: what lookups occupying them all would leave the rest of the server
/// (a verification meanwhile finds none and answers 503).
pub async fn hold_verification_readers<S: VerificationReaders>(
    store: &S,
) -> Vec<sqlx::pool::PoolConnection<S::Database>> {
    hold_all(store.verification_readers()).await
}

async fn hold_all<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Vec<sqlx::pool::PoolConnection<DB>> {
    let mut held = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        held.push(pool.acquire().await.expect("take a connection of the pool"));
    }
    held
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_database("postgres://u:p@h/test?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h", "x"), "postgres://h/x");
    }
}
