//! Call limits per client address (docs/access-control.md#call-limits). Charged: every
//! `GetChallenge`, and every refusal that writes an entry of its own (`Attest` with a
//! malformed, unknown or used nonce, any refused `RequestGrant` or `FetchWeights`, any call
//! refused for its certificate or role). An `Attest` with a live nonce is not charged: the
//! `GetChallenge` that issued it was, and nonces are single use. Each of those calls writes an
//! fsynced audit entry, so without a limit one host could grow the log, and the disk
//! under it, as fast as it can send. A token bucket per address: `burst` calls at once,
//! refilled at `rate` per second. Refused calls are counted, not recorded one by one: the first refusal
//! of an address writes one `rate_limited` entry, and later ones at most one entry per
//! [`REPORT_EVERY_MS`] with the number refused since the last.
//!
//! IPv4 addresses count one by one; IPv6 addresses by their /64 prefix (RFC 4291 §2.5.4: the
//! interface identifier is the low 64 bits, so one host or subnet can use any number of them).
//! Counters live in this process and use the vault's clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use crate::config::LimitsConfig;
use crate::time::UnixMs;

/// Refusals of one address are recorded at most once per this period.
pub const REPORT_EVERY_MS: u64 = 60_000;
/// Addresses that get a `rate_limited` entry each from one background check or stop; the
/// others share one entry.
pub const MAX_REPORTS: usize = 100;
/// Addresses tracked at most; beyond this, addresses whose buckets have refilled are forgotten,
/// and if that frees less than a tenth of the table, all of them (memory stays bounded under a
/// many-address flood, and a full table is not scanned again for every new address).
pub const MAX_PEERS: usize = 100_000;

/// Whom a bucket belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerKey {
    V4([u8; 4]),
    /// The /64 prefix of an IPv6 address.
    V6([u8; 8]),
    /// The transport gave no address (every such call shares one bucket).
    Unknown,
}

impl PeerKey {
    pub fn of(addr: Option<SocketAddr>) -> Self {
        let Some(addr) = addr else {
            return PeerKey::Unknown;
        };
        match addr.ip().to_canonical() {
            IpAddr::V4(v4) => PeerKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                PeerKey::V6(prefix)
            }
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            PeerKey::V6(p) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(full))
            }
            PeerKey::Unknown => f.write_str("an unknown address"),
        }
    }
}

/// One `rate_limited` entry to write: who (an address, or how many others), the refusals,
/// and the counts it carries (to put back if the entry cannot be written).
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub who: String,
    pub refused: u64,
    pub counts: Vec<(PeerKey, u64)>,
}

/// Groups pending counts into entries: the [`MAX_REPORTS`] addresses with the most refusals
/// one each, most first, and the rest one together.
pub fn group_reports(mut pending: Vec<(PeerKey, u64)>) -> Vec<Report> {
    pending.sort_unstable_by_key(|(_, n)| std::cmp::Reverse(*n));
    let rest = pending.split_off(pending.len().min(MAX_REPORTS));
    let mut out: Vec<Report> = pending
        .into_iter()
        .map(|(key, n)| Report {
            who: key.to_string(),
            refused: n,
            counts: vec![(key, n)],
        })
        .collect();
    if !rest.is_empty() {
        out.push(Report {
            who: format!("{} other addresses", rest.len()),
            refused: rest.iter().map(|(_, n)| n).sum(),
            counts: rest,
        });
    }
    out
}

/// What to do with one call.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Refuse {
        /// When the address has a call again.
        retry_after_ms: u64,
        /// `Some(n)`: record a `rate_limited` entry now, for `n` refusals (this one included).
        report: Option<u64>,
    },
}

struct Bucket {
    /// Thousandths of a call, so that `rate` calls per second refill `rate` of them per ms.
    milli_tokens: u64,
    at: UnixMs,
    refused: u64,
    reported: Option<UnixMs>,
}

pub struct PeerLimiter {
    rate: u64,
    burst: u64,
    peers: Mutex<HashMap<PeerKey, Bucket>>,
}

impl PeerLimiter {
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            rate: u64::from(cfg.peer_calls_per_sec),
            burst: u64::from(cfg.peer_burst),
            peers: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate > 0
    }

    /// The bucket's level at `now` (a clock that stepped back refills nothing).
    fn level(&self, b: &Bucket, now: UnixMs) -> u64 {
        let elapsed = now.saturating_sub(b.at);
        b.milli_tokens
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.burst * 1000)
    }

    /// Takes one call from `peer`'s bucket, or refuses it.
    pub fn check(&self, peer: PeerKey, now: UnixMs) -> Verdict {
        if !self.enabled() {
            return Verdict::Allow;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if !peers.contains_key(&peer) && peers.len() >= MAX_PEERS {
            let full = self.burst * 1000;
            peers.retain(|_, b| b.refused > 0 || self.level(b, now) < full);
            if peers.len() > MAX_PEERS - MAX_PEERS / 10 {
                tracing::warn!(
                    tracked = peers.len(),
                    "call limits: more addresses than can be tracked; starting over"
                );
                peers.clear();
            }
        }
        let b = peers.entry(peer).or_insert(Bucket {
            milli_tokens: self.burst * 1000,
            at: now,
            refused: 0,
            reported: None,
        });
        b.milli_tokens = self.level(b, now);
        b.at = b.at.max(now);
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            return Verdict::Allow;
        }
        b.refused += 1;
        // After a clock step back the bucket refills from its last time, not from now.
        let retry_after_ms = (1000 - b.milli_tokens).div_ceil(self.rate) + b.at.saturating_sub(now);
        let due = b
            .reported
            .is_none_or(|t| now.saturating_sub(t) >= REPORT_EVERY_MS);
        let report = due.then(|| {
            b.reported = Some(now);
            std::mem::take(&mut b.refused)
        });
        Verdict::Refuse {
            retry_after_ms,
            report,
        }
    }

    /// Takes the counts of refusals not yet on the record: of every address whose last entry is
    /// at least [`REPORT_EVERY_MS`] old, or of every address when `all` (a graceful stop). They
    /// count as recorded from `now`.
    pub fn take_pending(&self, now: UnixMs, all: bool) -> Vec<(PeerKey, u64)> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (key, b) in peers.iter_mut() {
            let due = all
                || b.reported
                    .is_none_or(|t| now.saturating_sub(t) >= REPORT_EVERY_MS);
            if b.refused > 0 && due {
                out.push((*key, std::mem::take(&mut b.refused)));
                b.reported = Some(now);
            }
        }
        out
    }

    /// Puts back a reported count whose `rate_limited` entry could not be written, so the next
    /// entry for the address carries it.
    pub fn unreport(&self, peer: PeerKey, refused: u64) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = peers.get_mut(&peer) {
            b.refused = b.refused.saturating_add(refused);
            b.reported = None;
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u32, burst: u32) -> PeerLimiter {
        PeerLimiter::new(&LimitsConfig {
            peer_calls_per_sec: rate,
            peer_burst: burst,
        })
    }

    fn refused(retry_after_ms: u64, report: Option<u64>) -> Verdict {
        Verdict::Refuse {
            retry_after_ms,
            report,
        }
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_burst_then_the_rate_and_a_report_once_a_minute() {
        let l = limiter(2, 3);
        let p = PeerKey::of(addr("192.0.2.1:5000"));
        for _ in 0..3 {
            assert_eq!(l.check(p, 1000), Verdict::Allow);
        }
        // Empty: at 2 calls per second the next one is 500 ms away; the first refusal reports.
        assert_eq!(l.check(p, 1000), refused(500, Some(1)));
        assert_eq!(l.check(p, 1200), refused(300, None));
        assert_eq!(l.check(p, 1500), Verdict::Allow);
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn the_count_since_the_last_report_is_carried() {
        let l = limiter(1, 1);
        let p = PeerKey::of(addr("192.0.2.9:1"));
        assert_eq!(l.check(p, 0), Verdict::Allow);
        assert!(matches!(
            l.check(p, 0),
            Verdict::Refuse {
                report: Some(1),
                ..
            }
        ));
        for _ in 0..4 {
            assert!(matches!(
                l.check(p, 10),
                Verdict::Refuse { report: None, .. }
            ));
        }
        // A minute on, the bucket has refilled: drain it, then the next refusal reports the
        // four held back and itself.
        assert_eq!(l.check(p, 60_000), Verdict::Allow);
        assert_eq!(l.check(p, 60_000), refused(1000, Some(5)));
        // An entry that could not be written: its count goes back, and the next refusal
        // reports at once.
        l.unreport(p, 5);
        assert_eq!(l.check(p, 60_001), refused(999, Some(6)));
    }

    #[test]
    fn pending_counts_are_taken_once_due_or_all_at_a_stop() {
        let l = limiter(1, 1);
        let (a, b) = (PeerKey::V4([192, 0, 2, 1]), PeerKey::V4([192, 0, 2, 2]));
        for p in [a, b] {
            assert_eq!(l.check(p, 0), Verdict::Allow);
            assert_eq!(l.check(p, 0), refused(1000, Some(1)));
        }
        for _ in 0..3 {
            assert_eq!(l.check(a, 100), refused(900, None));
        }
        assert_eq!(l.check(b, 100), refused(900, None));
        // Within the minute nothing is due; at a stop everything is.
        assert!(l.take_pending(59_999, false).is_empty());
        let mut due = l.take_pending(60_000, false);
        due.sort_by_key(|(_, n)| *n);
        assert_eq!(due, [(b, 1), (a, 3)]);
        assert!(l.take_pending(60_000, false).is_empty());
        assert_eq!(l.check(a, 60_000), Verdict::Allow);
        assert_eq!(l.check(a, 60_000), refused(1000, None));
        assert_eq!(l.take_pending(60_001, true), [(a, 1)]);
        assert!(l.take_pending(60_001, true).is_empty());
    }

    #[test]
    fn many_addresses_share_one_entry_past_the_first_hundred() {
        let pending: Vec<(PeerKey, u64)> = (0..250u32)
            .map(|i| (PeerKey::V4(i.to_be_bytes()), u64::from(i) + 1))
            .collect();
        let reports = group_reports(pending);
        assert_eq!(reports.len(), MAX_REPORTS + 1);
        // The most refused first, by name.
        assert_eq!(reports[0].who, "0.0.0.249");
        assert_eq!(reports[0].refused, 250);
        assert_eq!(reports[MAX_REPORTS - 1].refused, 151);
        // The other 150 (1..=150 refusals) together.
        let rest = &reports[MAX_REPORTS];
        assert_eq!(rest.who, "150 other addresses");
        assert_eq!(rest.refused, (1..=150).sum::<u64>());
        assert_eq!(rest.counts.len(), 150);
        assert!(group_reports(Vec::new()).is_empty());
        assert_eq!(group_reports(vec![(PeerKey::Unknown, 2)]).len(), 1);
    }

    #[test]
    fn addresses_have_their_own_buckets_and_ipv6_counts_by_64() {
        let l = limiter(1, 1);
        let a = PeerKey::of(addr("192.0.2.1:1"));
        let b = PeerKey::of(addr("192.0.2.2:1"));
        assert_eq!(l.check(a, 0), Verdict::Allow);
        assert_eq!(l.check(b, 0), Verdict::Allow);
        assert_ne!(l.check(a, 0), Verdict::Allow);
        // Two addresses in one /64 share a bucket; another /64 does not.
        let v6a = PeerKey::of(addr("[2001:db8:1:2::1]:1"));
        let v6b = PeerKey::of(addr("[2001:db8:1:2:ffff::9]:1"));
        let v6c = PeerKey::of(addr("[2001:db8:1:3::1]:1"));
        assert_eq!(v6a, v6b);
        assert_eq!(l.check(v6a, 0), Verdict::Allow);
        assert_ne!(l.check(v6b, 0), Verdict::Allow);
        assert_eq!(l.check(v6c, 0), Verdict::Allow);
        assert_eq!(v6a.to_string(), "2001:db8:1:2::/64");
        // An IPv4-mapped IPv6 address is its IPv4 address.
        assert_eq!(PeerKey::of(addr("[::ffff:192.0.2.1]:1")), a);
        assert_eq!(a.to_string(), "192.0.2.1");
        assert_eq!(PeerKey::of(None).to_string(), "an unknown address");
    }

    #[test]
    fn a_clock_that_steps_back_refills_nothing_and_zero_is_off() {
        let l = limiter(1, 1);
        let p = PeerKey::of(addr("192.0.2.1:1"));
        assert_eq!(l.check(p, 10_000), Verdict::Allow);
        assert_eq!(l.check(p, 5_000), refused(6_000, Some(1)));
        assert_ne!(l.check(p, 10_500), Verdict::Allow);
        assert_eq!(l.check(p, 11_000), Verdict::Allow);
        let off = limiter(0, 0);
        for _ in 0..10_000 {
            assert_eq!(off.check(p, 0), Verdict::Allow);
        }
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn tracked_addresses_stay_bounded() {
        let l = limiter(1, 2);
        let fill = |l: &PeerLimiter, from: u32, n: usize, now: UnixMs| {
            for i in from..from + n as u32 {
                assert_eq!(l.check(PeerKey::V4(i.to_be_bytes()), now), Verdict::Allow);
            }
        };
        fill(&l, 0, MAX_PEERS, 0);
        assert_eq!(l.tracked(), MAX_PEERS);
        // Ten seconds on every bucket has refilled: a new address makes room by forgetting
        // them.
        assert_eq!(
            l.check(PeerKey::V4([203, 0, 113, 1]), 10_000),
            Verdict::Allow
        );
        assert_eq!(l.tracked(), 1);
        // Full of half-used buckets: a new address starts the table over.
        fill(&l, 1 << 24, MAX_PEERS - 1, 10_000);
        assert_eq!(l.tracked(), MAX_PEERS);
        assert_eq!(
            l.check(PeerKey::V4([203, 0, 113, 2]), 10_000),
            Verdict::Allow
        );
        assert_eq!(l.tracked(), 1);
    }
}
