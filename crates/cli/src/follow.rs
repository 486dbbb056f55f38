//! What `audit tail --follow` (over the API) and `admin audit --follow` (on the store) remember of
//! the events they printed, so that a trail gone back under them (a restore from a backup, a
//! failover that lost its last commits: new events then take the seqs of lost ones) is noticed
//! and followed again from the right place, never skipped.
//!
//! Each asks with its newest printed event and some older ones (`after`, checked by
//! `keyplane_server::audit_positions::check_positions`); when the trail no longer holds the
//! newest, it is told the newest of them it does hold, forgets what it printed after that, warns
//! on stderr, and prints every event after it again.

use keyplane_core::audit_position::EventPosition;
use keyplane_server::audit_positions::MAX_POSITIONS;

/// The most recent printed events are kept one by one: a restore usually loses only the last few.
const RECENT: usize = 4;

/// Printed events, as positions: the newest, and older ones thinned as they age, so that the
/// positions reach back roughly exponentially far with [`MAX_POSITIONS`] of them.
pub struct Printed {
    /// How many events were recorded.
    count: u64,
    /// (the record's number, its position), oldest first. Starts with the chain's start, seq 0,
    /// which a trail holds unless retention pruned it.
    kept: Vec<(u64, EventPosition)>,
}

impl Default for Printed {
    fn default() -> Self {
        Self::new()
    }
}

impl Printed {
    pub fn new() -> Self {
        Self {
            count: 0,
            kept: vec![(0, EventPosition::of(0, &keyplane_core::audit::GENESIS))],
        }
    }

    /// An event was printed (or, where a follow starts without printing, taken as the start).
    pub fn record(&mut self, position: EventPosition) {
        if self.newest().seq >= position.seq {
            return;
        }
        self.count += 1;
        self.kept.push((self.count, position));
        if self.kept.len() > MAX_POSITIONS {
            self.thin();
        }
    }

    /// Drops the position whose loss leaves the smallest hole for its age: between its
    /// neighbours, measured against how long ago it was printed. The first (the oldest kept)
    /// and the most recent stay.
    fn thin(&mut self) {
        let newest = self.count;
        let last = self.kept.len().saturating_sub(RECENT);
        let drop = (1..last).min_by(|&a, &b| {
            let hole = |i: usize| {
                let span = self.kept[i + 1].0 - self.kept[i - 1].0;
                span as f64 / (newest - self.kept[i].0 + 1) as f64
            };
            hole(a).total_cmp(&hole(b))
        });
        if let Some(drop) = drop {
            self.kept.remove(drop);
        }
    }

    /// The newest printed event (the chain's start before any).
    pub fn newest(&self) -> &EventPosition {
        &self.kept.last().expect("never empty").1
    }

    /// Every kept position, newest first: the `after` a follow asks with.
    pub fn positions(&self) -> Vec<EventPosition> {
        self.kept.iter().rev().map(|(_, p)| p.clone()).collect()
    }

    /// The trail went back to `resume_after`: what was printed after it is not in the trail any
    /// more, and printing goes on after it.
    pub fn went_back(&mut self, resume_after: EventPosition) {
        self.kept.retain(|(_, p)| p.seq < resume_after.seq);
        self.count += 1;
        self.kept.push((self.count, resume_after));
    }
}

/// The warning a follow prints on stderr when the trail went back under it.
pub fn went_back_warning(
    command: &str,
    diverged_seq: u64,
    head_seq: u64,
    resume_after_seq: u64,
) -> String {
    format!(
        "{command}: warning: the audit trail went back (a restore from a backup, or a failover \
         that lost its last commits?): it no longer holds the event printed at seq \
         {diverged_seq}; the events printed with seqs {from} to {diverged_seq} may be lost, and \
         their seqs taken by new events. Printing every event after seq {resume_after_seq} again \
         (the trail's newest is seq {head_seq}); some repeat events printed before",
        from = resume_after_seq + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64) -> EventPosition {
        EventPosition::of(seq, &[seq as u8; 32])
    }

    #[test]
    fn positions_reach_back_with_the_recent_ones_whole() {
        let mut printed = Printed::new();
        for seq in 1..=10_000 {
            printed.record(at(seq));
        }
        let seqs: Vec<u64> = printed.positions().iter().map(|p| p.seq).collect();
        assert_eq!(seqs.len(), MAX_POSITIONS);
        assert_eq!(&seqs[..RECENT], &[10_000, 9_999, 9_998, 9_997]);
        assert_eq!(*seqs.last().unwrap(), 0, "the start stays: {seqs:?}");
        // Reaching back far, and not only near the start and the end.
        assert!(
            seqs.iter().any(|s| (5..9_000).contains(s)),
            "spread: {seqs:?}"
        );
        assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    }

    #[test]
    fn going_back_forgets_what_was_printed_after_the_resume_point() {
        let mut printed = Printed::new();
        for seq in 1..=20 {
            printed.record(at(seq));
        }
        printed.went_back(at(12));
        assert_eq!(printed.newest(), &at(12));
        assert!(printed.positions().iter().all(|p| p.seq <= 12));
        // Events reusing seqs 13.. are recorded again.
        printed.record(EventPosition::of(13, &[99; 32]));
        assert_eq!(printed.newest().seq, 13);
    }
}
