//! Logging what clients send without letting them write the log: values
//! from the wire are truncated and escaped, and lines a client can trigger
//! at will are rate-limited.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Characters of a client-supplied value shown in a log line.
pub const SHOWN_CHARS: usize = 64;

/// A client-supplied string as it may appear in a log: at most
/// [`SHOWN_CHARS`] characters, control characters and quotes escaped (so a
/// client id cannot forge log lines), and a note of how much was cut.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        f.write_str("\"")?;
        for c in chars.by_ref().take(SHOWN_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        f.write_str("\"")?;
        let rest = chars.count();
        if rest > 0 {
            write!(f, " (+{rest} more characters)")?;
        }
        Ok(())
    }
}

/// A client-supplied string cut to [`SHOWN_CHARS`] characters, for span
/// fields (which every output escapes itself).
pub fn cut(s: &str) -> &str {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// An optional client value for a log line.
pub fn shown(v: Option<&str>) -> Shown<'_> {
    Shown(v.unwrap_or(""))
}

/// Allows a log line at most `per_second` times a second; what is held back
/// is counted and reported with the next line let through.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogBudget {
    pub fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(n)`: log now, mentioning the `n` lines suppressed since the last
    /// one. `None`: suppressed (counted).
    pub fn take(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, used, suppressed) = &mut *st;
        if now.duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *used = 0;
        }
        if *used >= self.per_second {
            *suppressed += 1;
            return None;
        }
        *used += 1;
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_and_hostile_values_are_cut_and_escaped() {
        let v = format!("ab\ncd\u{1b}[31m{}", "x".repeat(70_000));
        let s = Shown(&v).to_string();
        assert!(!s.contains('\n') && !s.contains('\u{1b}'), "{s}");
        assert!(s.starts_with(r#""ab\ncd\u{1b}[31m"#), "{s}");
        assert!(s.len() < 200, "{} bytes", s.len());
        assert!(s.ends_with("(+69946 more characters)"), "{s}");
        assert_eq!(Shown("dev-1").to_string(), "\"dev-1\"");
    }

    #[test]
    fn budget_suppresses_and_reports() {
        let b = LogBudget::new(2);
        let t0 = Instant::now();
        assert_eq!(b.take(t0), Some(0));
        assert_eq!(b.take(t0), Some(0));
        assert_eq!(b.take(t0), None);
        assert_eq!(b.take(t0), None);
        assert_eq!(b.take(t0 + Duration::from_secs(1)), Some(2));
    }
}
