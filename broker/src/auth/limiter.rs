//! Per-address limit on failed authentications, so a token cannot be
//! guessed at line rate from one host.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Entries kept at most; past it, expired windows are swept first and, if
/// still full, the table is cleared (a flood from many addresses must not
/// grow memory without bound).
const MAX_ENTRIES: usize = 65_536;

#[derive(Debug)]
pub struct FailureLimiter {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(per_minute: u32) -> Self {
        FailureLimiter {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// True if `ip` has used up its failures for the current window.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&ip)
            .is_some_and(|&(start, n)| now.duration_since(start) < WINDOW && n >= self.per_minute)
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_ENTRIES {
            seen.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if seen.len() >= MAX_ENTRIES {
                seen.clear();
            }
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_passes() {
        let l = FailureLimiter::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!l.is_blocked(ip, t0));
            l.record_failure(ip, t0);
        }
        assert!(l.is_blocked(ip, t0));
        assert!(!l.is_blocked(other, t0), "per address");
        assert!(!l.is_blocked(ip, t0 + WINDOW), "window over");
    }

    #[test]
    fn zero_disables() {
        let l = FailureLimiter::new(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..100 {
            l.record_failure(ip, t0);
        }
        assert!(!l.is_blocked(ip, t0));
    }
}
