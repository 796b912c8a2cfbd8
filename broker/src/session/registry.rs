//! Client id → session map: clean/persistent start, takeover, expiry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::state::{ConnLink, QueueLimits, Session};

#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    next_key: AtomicU64,
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

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds or creates the session for `client_id` and attaches `link`
    /// (kicking any connection already attached: takeover).
    pub fn open(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: Duration,
        link: Arc<ConnLink>,
        limits: QueueLimits,
    ) -> Opened {
        let mut map = self.lock();
        let existing = map.get(client_id).cloned();
        let (session, present, replaced) = match existing {
            Some(s) if !clean_start => (s, true, None),
            other => {
                if let Some(old) = &other {
                    // The old connection must go even though its session does too.
                    if let Some(l) = old.lock().link.take() {
                        l.kick(starling_codec::reason::SESSION_TAKEN_OVER);
                    }
                }
                let key = self.next_key.fetch_add(1, Ordering::Relaxed) + 1;
                let s = Arc::new(Session::new(key, Arc::from(client_id), limits));
                map.insert(s.client_id.clone(), s.clone());
                (s, false, other)
            }
        };
        drop(map);
        session.attach(link, expiry);
        Opened {
            session,
            present,
            replaced,
        }
    }

    /// Removes the session if it is still the one registered for its id.
    pub fn remove(&self, session: &Arc<Session>) -> bool {
        let mut map = self.lock();
        match map.get(&session.client_id) {
            Some(cur) if Arc::ptr_eq(cur, session) => {
                map.remove(&session.client_id);
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
            .iter()
            .filter(|(_, s)| {
                let st = s.lock();
                st.link.is_none()
                    && st
                        .disconnected_at
                        .is_some_and(|at| now.saturating_duration_since(at) >= st.expiry)
            })
            .map(|(k, _)| k.clone())
            .collect();
        expired.iter().filter_map(|k| map.remove(k)).collect()
    }

    /// Every session with a connection attached (for shutdown and kicks).
    pub fn online(&self) -> Vec<Arc<Session>> {
        self.lock()
            .values()
            .filter(|s| s.is_online())
            .cloned()
            .collect()
    }
}

impl Registry {
    /// Key of the session currently registered for `client_id`.
    pub fn current_key(&self, client_id: &str) -> Option<u64> {
        self.lock().get(client_id).map(|s| s.key)
    }
}
