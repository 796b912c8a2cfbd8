//! Topic names, topic filters and matching — pure functions, no allocation on
//! the matching path.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic name contains a wildcard ('+' or '#')")]
    WildcardInName,
    #[error("'#' must be the last level of a filter and stand alone in it")]
    MisplacedHash,
    #[error("'+' must stand alone in a level")]
    MisplacedPlus,
    #[error("topic is {len} characters long; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic contains the character {0:?}, which the topic policy does not allow")]
    ForbiddenChar(char),
    #[error("invalid shared subscription: {0}")]
    InvalidShare(&'static str),
    #[error("topic has more than {max} levels")]
    TooManyLevels { max: usize },
    /// A `?name=value` topic option other than `pubStates=0|1`.
    #[error("unknown topic option {0:?}; the only option is pubStates=1")]
    UnknownOption(String),
}

/// Checks that `topic` (a name or a filter without its `$share/` prefix)
/// has at most `max` levels. Counting stops at the first level over the
/// limit, so the cost is bounded by `max`, not by the input.
pub fn check_levels(topic: &str, max: usize) -> Result<(), TopicError> {
    match topic
        .bytes()
        .filter(|&b| b == b'/')
        .nth(max.saturating_sub(1))
    {
        Some(_) => Err(TopicError::TooManyLevels { max }),
        None => Ok(()),
    }
}

/// Checks a topic *name* (what PUBLISH carries): non-empty, no wildcards, no NUL.
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    for b in topic.bytes() {
        match b {
            b'+' | b'#' => return Err(TopicError::WildcardInName),
            0 => return Err(TopicError::Nul),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a topic *filter* (what SUBSCRIBE carries, after any `$share/group/`
/// prefix has been removed).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.contains('\0') {
        return Err(TopicError::Nul);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedHash);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedPlus);
        }
    }
    Ok(())
}

/// Does `filter` match topic name `topic`? Topics starting with `$` are not
/// matched by a wildcard in the first level (MQTT 4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Does a filter's first level hold a wildcard? Such filters never match
/// `$`-topics (MQTT 4.7.2), which both [`covers`] and [`overlaps`] must honour
/// to agree with [`matches`].
fn wildcard_first(filter: &str) -> bool {
    filter.starts_with('+') || filter.starts_with('#')
}

/// Does `outer` match every topic that `inner` matches? An ACL allows a
/// subscription only when an allowed filter covers it; matching a single
/// topic is not enough because the subscriber would then also receive topics
/// the rule never granted (`a/+/c` must not grant `a/#`).
///
/// Exact for valid filters (see [`validate_filter`]): it returns `true` if and
/// only if no topic name exists that `inner` matches and `outer` does not. A
/// `$share/group/` prefix must be removed first.
pub fn covers(outer: &str, inner: &str) -> bool {
    if wildcard_first(outer) && inner.starts_with('$') {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    let mut level = 0;
    let mut first_empty = false;
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) | (None, None) => return true,
            // `#` also matches the parent level ("a/#" matches "a"), which
            // `+/#` does not, unless that parent would be the empty string
            // (no topic at all, or the single level ""), which is not a
            // topic name: there `+/#` and `#` match the same topics.
            (Some("+"), Some("#")) => {
                return empty_prefix(level, first_empty) && o.next() == Some("#");
            }
            (Some(ol), Some(il)) if ol == "+" || ol == il => {
                if level == 0 {
                    first_empty = il.is_empty();
                }
            }
            _ => return false,
        }
        level += 1;
    }
}

/// Could some topic name match both `a` and `b`? A subscription must be
/// refused when a deny rule overlaps it; otherwise messages on the denied
/// topics would reach the subscriber through the wider filter.
///
/// Exact for valid filters, like [`covers`]. Symmetric.
pub fn overlaps(a: &str, b: &str) -> bool {
    if (wildcard_first(a) && b.starts_with('$')) || (wildcard_first(b) && a.starts_with('$')) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    let mut level = 0;
    let mut first_empty = false;
    loop {
        match (x.next(), y.next()) {
            // The only common topic is the levels seen so far; it must not
            // be the empty string ("/#" and "+" share only "").
            (Some("#"), None) | (None, Some("#")) => return !empty_prefix(level, first_empty),
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {
                if level == 0 {
                    first_empty = p.is_empty() || q.is_empty();
                }
            }
            _ => return false,
        }
        level += 1;
    }
}

/// Would a topic made of the first `level` levels be the empty string?
fn empty_prefix(level: usize, first_empty: bool) -> bool {
    level == 0 || (level == 1 && first_empty)
}

/// A subscription filter split into its parts: `$share/<group>/<filter>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Splits off a `$share/group/` prefix and validates what remains.
pub fn parse_subscription(raw: &str) -> Result<SubscriptionFilter<'_>, TopicError> {
    let (share_group, filter) = match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest
                .split_once('/')
                .ok_or(TopicError::InvalidShare("missing filter after the group"))?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::InvalidShare(
                    "group name must be non-empty without wildcards",
                ));
            }
            (Some(group), filter)
        }
        None => (None, raw),
    };
    validate_filter(filter)?;
    Ok(SubscriptionFilter {
        share_group,
        filter,
    })
}

/// Options a subscription filter may carry after `?`, EVRYTHNG style
/// (`sensors/+/temp?pubStates=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicOptions {
    /// Send the last value of every matching topic first (without the
    /// retain flag), then live messages.
    pub pub_states: bool,
}

/// Splits `filter?options` into the filter and its options. `?` is
/// therefore reserved in subscription filters (topic names may still
/// contain it). Unknown options, or a value other than 0/1, are refused so
/// that a typo is not silently ignored.
pub fn split_options(raw: &str) -> Result<(&str, TopicOptions), TopicError> {
    let Some((filter, query)) = raw.split_once('?') else {
        return Ok((raw, TopicOptions::default()));
    };
    let mut opts = TopicOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("pubStates", "1")) => opts.pub_states = true,
            Some(("pubStates", "0")) => opts.pub_states = false,
            _ => {
                let shown: String = pair.chars().take(64).collect();
                return Err(TopicError::UnknownOption(shown));
            }
        }
    }
    Ok((filter, opts))
}

/// [`split_options`] then [`parse_subscription`]: what a SUBSCRIBE filter,
/// a stream path or a wildcard GET is made of.
pub fn parse_with_options(raw: &str) -> Result<(SubscriptionFilter<'_>, TopicOptions), TopicError> {
    let (rest, opts) = split_options(raw)?;
    Ok((parse_subscription(rest)?, opts))
}

/// An optional topic policy (length and character set) applied to topic names
/// and filters. MQTT defaults to no policy; the HTTP API defaults to
/// [`TopicPolicy::shiftr`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicPolicy {
    /// Maximum length in characters.
    pub max_len: Option<usize>,
    /// Extra characters allowed besides ASCII letters and digits; `None` means
    /// any character is allowed.
    pub allowed_extra: Option<String>,
}

impl TopicPolicy {
    /// shiftr.io's limits: 128 characters; letters, digits and `.,:;-_$/+#`.
    pub fn shiftr() -> Self {
        TopicPolicy {
            max_len: Some(128),
            allowed_extra: Some(".,:;-_$/+#".to_string()),
        }
    }

    /// Checks a topic name.
    pub fn check(&self, topic: &str) -> Result<(), TopicError> {
        self.check_with(topic, "")
    }

    /// Checks a subscription filter: the wildcards `+` and `#` are always
    /// allowed (their placement is [`validate_filter`]'s job), so a policy
    /// that lists only name characters does not forbid wildcard subscriptions.
    pub fn check_filter(&self, filter: &str) -> Result<(), TopicError> {
        self.check_with(filter, "+#")
    }

    fn check_with(&self, topic: &str, also: &str) -> Result<(), TopicError> {
        if let Some(max) = self.max_len {
            let len = topic.chars().count();
            if len > max {
                return Err(TopicError::TooLong { len, max });
            }
        }
        let forbidden = self.allowed_extra.as_ref().and_then(|extra| {
            topic
                .chars()
                .find(|c| !c.is_ascii_alphanumeric() && !extra.contains(*c) && !also.contains(*c))
        });
        if let Some(c) = forbidden {
            return Err(TopicError::ForbiddenChar(c));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_options() {
        assert_eq!(split_options("a/b"), Ok(("a/b", TopicOptions::default())));
        let on = TopicOptions { pub_states: true };
        assert_eq!(split_options("a/+?pubStates=1"), Ok(("a/+", on)));
        assert_eq!(split_options("a/#?"), Ok(("a/#", TopicOptions::default())));
        assert_eq!(
            split_options("a?pubStates=0"),
            Ok(("a", TopicOptions::default()))
        );
        assert_eq!(
            split_options("a?pubStates=2"),
            Err(TopicError::UnknownOption("pubStates=2".into()))
        );
        assert_eq!(
            split_options("a?project=x"),
            Err(TopicError::UnknownOption("project=x".into()))
        );
        let (f, o) = parse_with_options("$share/g/a/+?pubStates=1").unwrap();
        assert_eq!((f.share_group, f.filter, o), (Some("g"), "a/+", on));
        assert!(parse_with_options("a/#/b?pubStates=1").is_err());
    }

    #[test]
    fn policy_allows_wildcards_in_filters_only() {
        let p = TopicPolicy {
            max_len: Some(8),
            allowed_extra: Some("/".into()),
        };
        assert!(p.check_filter("a/+/#").is_ok());
        assert_eq!(p.check("a/+"), Err(TopicError::ForbiddenChar('+')));
        assert_eq!(p.check_filter("a b"), Err(TopicError::ForbiddenChar(' ')));
        assert!(matches!(
            p.check_filter("a/b/c/d/e"),
            Err(TopicError::TooLong { .. })
        ));
    }

    #[test]
    fn level_limit() {
        assert!(check_levels("a", 1).is_ok());
        assert_eq!(
            check_levels("a/b", 1),
            Err(TopicError::TooManyLevels { max: 1 })
        );
        assert!(
            check_levels(&"/".repeat(127), 128).is_ok(),
            "128 empty levels"
        );
        assert!(check_levels(&"/".repeat(128), 128).is_err(), "129 levels");
        assert!(check_levels(&"/".repeat(65_000), 128).is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("a/b").is_ok());
        assert!(validate_name("/").is_ok());
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a\0"), Err(TopicError::Nul));
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/#", "+/+/c", "a//b", "/", "$SYS/#", "a/+/#"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(validate_filter("a/#/b"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a#"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a/b+"), Err(TopicError::MisplacedPlus));
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
    }

    #[test]
    fn matching_table() {
        let cases = [
            ("a/b/c", "a/b/c", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+", "a", true),
            ("+", "a/b", false),
            ("+/+", "/a", true),
            ("a/+", "a/", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
        ];
        for (f, t, want) in cases {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn shared() {
        let s = parse_subscription("$share/g1/a/+").unwrap();
        assert_eq!(s.share_group, Some("g1"));
        assert_eq!(s.filter, "a/+");
        assert!(parse_subscription("$share/g1").is_err());
        assert!(parse_subscription("$share//a").is_err());
        assert!(parse_subscription("$share/g+/a").is_err());
        assert_eq!(parse_subscription("a/b").unwrap().share_group, None);
    }

    #[test]
    fn policy() {
        let p = TopicPolicy::shiftr();
        assert!(p.check("a/b-c_d.e:f;g,h$/#+").is_ok());
        assert_eq!(p.check("a b"), Err(TopicError::ForbiddenChar(' ')));
        assert!(matches!(
            p.check(&"x".repeat(129)),
            Err(TopicError::TooLong { .. })
        ));
        assert!(TopicPolicy::default().check("any thing ✓").is_ok());
    }
}
