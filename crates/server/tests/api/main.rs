//! Black-box tests: the real server on a random loopback port, spoken to over HTTP, against
//! SQLite and against PostgreSQL.

mod helpers;

mod aether_api_tokens;
mod audit;
mod hybridbox;
mod logs;
mod oidc;
mod operations;
mod robots;
mod verify;
