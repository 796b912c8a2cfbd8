//! Client id → session map: clean/persistent start, takeover, expiry, and
//! who owns a client id.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::state::{ConnLink, QueueLimits, Session};

#[derive(Debug, Default)]
struct Map {
    by_id: HashSet<ById>,
    /// Sessions counted against `max_persistent_sessions`.
    persistent: usize,
}

/// A session in the map, found by its client id: the id is the session's
/// own, so an entry is one pointer rather than a key and a value (every
/// connected client has one).
#[derive(Debug)]
struct ById(Arc<Session>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.client_id
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.client_id == other.0.client_id
    }
}

impl Eq for ById {}

impl Hash for ById {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // As `str` hashes: lookups borrow the id as one.
        (*self.0.client_id).hash(h)
    }
}

impl Map {
    fn forget(&mut self, s: &Session) {
        if s.counted_persistent.swap(false, Ordering::Relaxed) {
            self.persistent -= 1;
        }
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<Map>,
    next_key: AtomicU64,
    /// Subscribers that are not MQTT sessions (WebSocket topic streams,
    /// waiting HTTP GETs), by session key: they have no client id, but a
    /// bundle change or shutdown must reach them too.
    web: Mutex<HashMap<u64, Arc<ConnLink>>>,
}

/// What a CONNECT asks of the registry.
pub struct OpenRequest<'a> {
    /// Registry key: the client id, namespaced by token where configured.
    pub key: &'a str,
    /// The connecting token (`None`: anonymous).
    pub owner: Option<Arc<str>>,
    pub clean_start: bool,
    pub expiry: Duration,
    pub link: Arc<ConnLink>,
    pub limits: QueueLimits,
    pub max_persistent: usize,
}

/// Result of [`Registry::open`].
pub struct Opened {
    pub session: Arc<Session>,
    /// CONNACK session-present flag.
    pub present: bool,
    /// A session the clean start replaced; its subscriptions must be removed
    /// from the router.
    pub replaced: Option<Arc<Session>>,
}

/// Why [`Registry::open`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the client id is held by another token")]
    NotOwner,
    #[error("the broker holds max_persistent_sessions persistent sessions")]
    PersistentFull,
}

/// May a connection of `who` take over a session owned by `holder`? A
/// token may take its own sessions and anonymous ones (so anonymous clients
/// cannot squat a device's id); anonymous clients only anonymous ones.
pub fn may_take_over(holder: Option<&str>, who: Option<&str>) -> bool {
    match (holder, who) {
        (None, _) => true,
        (Some(h), Some(w)) => h == w,
        (Some(_), None) => false,
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds or creates the session for `req.key` and attaches `req.link`
    /// (kicking any connection already attached: takeover), all under the
    /// registry lock, so a concurrent CONNECT with the same id or the expiry
    /// reaper always sees either the old or the new attachment — never a
    /// live connection whose session is no longer registered.
    pub fn open(&self, req: OpenRequest<'_>) -> Result<Opened, OpenError> {
        let mut map = self.lock();
        let existing = map.by_id.get(req.key).map(|e| e.0.clone());
        if let Some(s) = &existing
            && !may_take_over(s.owner.as_deref(), req.owner.as_deref())
        {
            return Err(OpenError::NotOwner);
        }
        let wants_slot = !req.expiry.is_zero();
        let (session, present, replaced) = match existing {
            Some(s) if !req.clean_start => {
                if wants_slot && !s.counted_persistent.load(Ordering::Relaxed) {
                    if map.persistent >= req.max_persistent {
                        return Err(OpenError::PersistentFull);
                    }
                    s.counted_persistent.store(true, Ordering::Relaxed);
                    map.persistent += 1;
                }
                (s, true, None)
            }
            other => {
                let freed = other
                    .as_ref()
                    .is_some_and(|o| o.counted_persistent.load(Ordering::Relaxed));
                if wants_slot && map.persistent - usize::from(freed) >= req.max_persistent {
                    return Err(OpenError::PersistentFull);
                }
                if let Some(old) = &other {
                    // The old connection must go even though its session does too.
                    if let Some(l) = old.lock().link.take() {
                        l.kick(starling_codec::reason::SESSION_TAKEN_OVER);
                    }
                    map.forget(old);
                }
                let key = self.next_key.fetch_add(1, Ordering::Relaxed) + 1;
                let s = Arc::new(Session::owned(
                    key,
                    Arc::from(req.key),
                    req.limits,
                    req.owner.clone(),
                ));
                if wants_slot {
                    s.counted_persistent.store(true, Ordering::Relaxed);
                    map.persistent += 1;
                }
                // Replaces the old session, if any (forgotten above).
                map.by_id.replace(ById(s.clone()));
                (s, false, other)
            }
        };
        session.attach(req.link, req.expiry);
        drop(map);
        Ok(Opened {
            session,
            present,
            replaced,
        })
    }

    /// Registers a session read back from the store at startup: offline,
    /// counted against `max_persistent_sessions` like any persistent one.
    pub fn restore(
        &self,
        id: Arc<str>,
        owner: Option<Arc<str>>,
        limits: QueueLimits,
        expiry: Duration,
        disconnected_at: Instant,
    ) -> Arc<Session> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed) + 1;
        let s = Arc::new(Session::owned(key, id.clone(), limits, owner));
        {
            let mut st = s.lock();
            st.expiry = expiry;
            st.disconnected_at = Some(disconnected_at);
        }
        let mut map = self.lock();
        s.counted_persistent.store(true, Ordering::Relaxed);
        map.persistent += 1;
        if let Some(old) = map.by_id.replace(ById(s.clone())) {
            map.forget(&old.0);
        }
        s
    }

    /// Removes the session if it is still the one registered for its id.
    pub fn remove(&self, session: &Arc<Session>) -> bool {
        let mut map = self.lock();
        match map.by_id.get(&*session.client_id) {
            Some(cur) if Arc::ptr_eq(&cur.0, session) => {
                map.by_id.remove(&*session.client_id);
                map.forget(session);
                true
            }
            _ => false,
        }
    }

    /// Sessions offline for longer than their expiry interval; removed from
    /// the registry and returned so the caller can drop their subscriptions.
    pub fn take_expired(&self, now: Instant) -> Vec<Arc<Session>> {
        let mut map = self.lock();
        let expired: Vec<Arc<str>> = map
            .by_id
            .iter()
            .filter(|ById(s)| {
                let st = s.lock();
                st.link.is_none()
                    && st
                        .disconnected_at
                        .is_some_and(|at| now.saturating_duration_since(at) >= st.expiry)
            })
            .map(|e| e.0.client_id.clone())
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for k in &expired {
            if let Some(ById(s)) = map.by_id.take(&**k) {
                map.forget(&s);
                out.push(s);
            }
        }
        out
    }

    /// A session key for a subscriber outside the client-id map; its link
    /// is told about bundle changes until [`Registry::leave_web`].
    pub fn join_web(&self, link: Arc<ConnLink>) -> u64 {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed) + 1;
        self.web
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, link);
        key
    }

    pub fn leave_web(&self, key: u64) {
        self.web
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// Links of the web subscribers (for rechecks after a bundle change).
    pub fn web_links(&self) -> Vec<Arc<ConnLink>> {
        self.web
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every session, online or not (for the admin API).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.lock().by_id.iter().map(|e| e.0.clone()).collect()
    }

    /// The session registered for `client_id`.
    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.lock().by_id.get(client_id).map(|e| e.0.clone())
    }

    /// Every session with a connection attached (for shutdown and kicks).
    pub fn online(&self) -> Vec<Arc<Session>> {
        self.lock()
            .by_id
            .iter()
            .filter(|e| e.0.is_online())
            .map(|e| e.0.clone())
            .collect()
    }

    /// Key of the session currently registered for `client_id`.
    pub fn current_key(&self, client_id: &str) -> Option<u64> {
        self.lock().by_id.get(client_id).map(|e| e.0.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QueueLimits = QueueLimits {
        max_messages: 10,
        max_bytes: 1000,
    };

    fn req<'a>(key: &'a str, owner: Option<&str>, clean: bool, expiry: u64) -> OpenRequest<'a> {
        OpenRequest {
            key,
            owner: owner.map(Arc::from),
            clean_start: clean,
            expiry: Duration::from_secs(expiry),
            link: Arc::new(ConnLink::default()),
            limits: LIMITS,
            max_persistent: 2,
        }
    }

    #[test]
    fn ownership_rules() {
        assert!(may_take_over(None, None));
        assert!(
            may_take_over(None, Some("alice")),
            "tokens displace anonymous squatters"
        );
        assert!(may_take_over(Some("alice"), Some("alice")));
        assert!(!may_take_over(Some("alice"), Some("bob")));
        assert!(!may_take_over(Some("alice"), None));
    }

    #[test]
    fn another_token_cannot_take_a_client_id() {
        let r = Registry::default();
        let a = r.open(req("dev", Some("alice"), false, 60)).unwrap();
        let link = a.session.lock().link.clone().unwrap();
        assert_eq!(
            r.open(req("dev", Some("bob"), true, 0)).err(),
            Some(OpenError::NotOwner)
        );
        assert_eq!(
            r.open(req("dev", None, true, 0)).err(),
            Some(OpenError::NotOwner)
        );
        assert!(link.kicked().is_none(), "alice was not kicked");
        assert!(
            r.open(req("dev", Some("alice"), false, 60))
                .unwrap()
                .present
        );
        assert!(link.kicked().is_some(), "alice took her own session over");
    }

    #[test]
    fn persistent_cap_counts_sessions_not_connections() {
        let r = Registry::default();
        r.open(req("a", None, false, 60)).unwrap();
        r.open(req("b", None, false, 60)).unwrap();
        assert_eq!(
            r.open(req("c", None, false, 60)).err(),
            Some(OpenError::PersistentFull)
        );
        assert!(
            r.open(req("c", None, true, 0)).is_ok(),
            "clean sessions are not capped"
        );
        assert!(
            r.open(req("a", None, false, 60)).unwrap().present,
            "resume is fine"
        );
        assert!(
            r.open(req("a", None, true, 60)).is_ok(),
            "a clean start replaces its own"
        );
        assert_eq!(r.lock().persistent, 2);
        let b = r.open(req("b", None, false, 60)).unwrap().session;
        assert!(r.remove(&b));
        assert_eq!(r.lock().persistent, 1);
        assert!(r.open(req("c", None, false, 60)).is_ok());
    }

    /// Fails reliably (tens of orphaned live links) when `attach` runs
    /// after the registry lock is released.
    #[test]
    fn concurrent_opens_leave_exactly_one_live_connection_registered() {
        let r = Arc::new(Registry::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut links = Vec::new();
                    for i in 0..20_000 {
                        let q = req("x", None, i % 2 == 0, 0);
                        links.push(q.link.clone());
                        let _ = r.open(q);
                    }
                    links
                })
            })
            .collect();
        let links: Vec<Arc<ConnLink>> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let live: Vec<_> = links.iter().filter(|l| l.kicked().is_none()).collect();
        assert_eq!(live.len(), 1, "one connection may stay: the last one");
        let map = r.lock();
        let s = &map.by_id.get("x").unwrap().0;
        assert!(
            s.lock().owned_by(live[0]),
            "and its session is the registered one"
        );
    }
}
