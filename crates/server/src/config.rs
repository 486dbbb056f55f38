//! Runtime settings, as plain data. `cli` fills this from flags and environment; tests build it.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// Management API requests per minute per credential; 0 turns the limit off.
    pub rate_limit_per_minute: u32,
    /// How many requests a credential may send at once before the per-minute rate applies.
    pub rate_limit_burst: u32,
    /// How far `last_used_at` may lag behind use.
    pub last_used_flush_interval: Duration,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            rate_limit_per_minute: 100,
            rate_limit_burst: 10,
            last_used_flush_interval: Duration::from_secs(5),
            max_body_bytes: 64 * 1024,
        }
    }
}
