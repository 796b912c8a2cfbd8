//! Limits on failed authentications, so a token cannot be guessed at line
//! rate. Counted per (source address, username): behind a NAT or a load
//! balancer many clients share an address, and one misconfigured or hostile
//! client must not lock out every good one. A higher ceiling per address
//! over all usernames stops guessing with a fresh username each time.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Entries kept per table at most; past it, expired windows are swept
/// first and, if still full, the table is cleared (a flood from many
/// addresses must not grow memory without bound).
const MAX_ENTRIES: usize = 65_536;

/// Failures in the current window of one key.
#[derive(Debug)]
struct Windows<K> {
    seen: HashMap<K, (Instant, u32)>,
}

impl<K: Hash + Eq + Copy> Windows<K> {
    fn count(&self, k: &K, now: Instant) -> u32 {
        match self.seen.get(k) {
            Some(&(start, n)) if now.duration_since(start) < WINDOW => n,
            _ => 0,
        }
    }

    fn record(&mut self, k: K, now: Instant) {
        if self.seen.len() >= MAX_ENTRIES {
            self.seen
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if self.seen.len() >= MAX_ENTRIES {
                self.seen.clear();
            }
        }
        let e = self.seen.entry(k).or_insert((now, 0));
        if now.duration_since(e.0) >= WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

impl<K> Default for Windows<K> {
    fn default() -> Self {
        Windows {
            seen: HashMap::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    /// Keyed by a hash of the username (a keyed hash: usernames are up to
    /// 64 KiB and chosen by the client, so they are not stored).
    pairs: Windows<(IpAddr, u64)>,
    addrs: Windows<IpAddr>,
}

#[derive(Debug)]
pub struct FailureLimiter {
    per_pair: u32,
    per_addr: u32,
    hasher: RandomState,
    tables: Mutex<Tables>,
}

impl FailureLimiter {
    /// `per_pair` failures per (address, username) and `per_addr` per
    /// address, each per minute; `per_pair == 0` disables limiting.
    pub fn new(per_pair: u32, per_addr: u32) -> Self {
        FailureLimiter {
            per_pair,
            per_addr,
            hasher: RandomState::new(),
            tables: Mutex::new(Tables::default()),
        }
    }

    fn key(&self, ip: IpAddr, username: Option<&str>) -> (IpAddr, u64) {
        (ip, self.hasher.hash_one(username.unwrap_or("")))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if `username` from `ip` has used up its failures for the
    /// current window, or `ip` has used up its ceiling.
    pub fn is_blocked(&self, ip: IpAddr, username: Option<&str>, now: Instant) -> bool {
        if self.per_pair == 0 {
            return false;
        }
        let key = self.key(ip, username);
        let t = self.lock();
        t.pairs.count(&key, now) >= self.per_pair
            || (self.per_addr > 0 && t.addrs.count(&ip, now) >= self.per_addr)
    }

    pub fn record_failure(&self, ip: IpAddr, username: Option<&str>, now: Instant) {
        if self.per_pair == 0 {
            return;
        }
        let key = self.key(ip, username);
        let mut t = self.lock();
        t.pairs.record(key, now);
        t.addrs.record(ip, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_the_pair_after_the_limit_until_the_window_passes() {
        let l = FailureLimiter::new(3, 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!l.is_blocked(ip, Some("mallory"), t0));
            l.record_failure(ip, Some("mallory"), t0);
        }
        assert!(l.is_blocked(ip, Some("mallory"), t0));
        assert!(
            !l.is_blocked(ip, Some("alice"), t0),
            "other usernames behind the same address"
        );
        assert!(!l.is_blocked(other, Some("mallory"), t0), "per address");
        assert!(
            !l.is_blocked(ip, Some("mallory"), t0 + WINDOW),
            "window over"
        );
    }

    #[test]
    fn the_address_ceiling_covers_fresh_usernames() {
        let l = FailureLimiter::new(3, 5);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..5 {
            l.record_failure(ip, Some(&format!("guess-{i}")), t0);
        }
        assert!(l.is_blocked(ip, Some("alice"), t0));
        assert!(l.is_blocked(ip, None, t0));
    }

    #[test]
    fn zero_disables() {
        let l = FailureLimiter::new(0, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..100 {
            l.record_failure(ip, None, t0);
        }
        assert!(!l.is_blocked(ip, None, t0));
    }
}
