//! Black-box tests: the real server on a random loopback port, spoken to over HTTP, against
//! SQLite and against PostgreSQL.

mod helpers;

mod aether_api_tokens;
mod audit;
mod audit_follow;
mod background;
mod canary;
mod clock_skew;
mod console;
mod edge;
mod faulty_store;
mod hybridbox;
mod idempotency;
mod input_limits;
mod leaks;
mod lifecycle;
mod limits;
mod listener_health;
mod logs;
mod oidc;
mod operations;
mod organizations;
mod pg_proxy;
mod revocations;
mod revoke_org;
mod robots;
mod verification_reads;
mod verify;
mod webhooks;
