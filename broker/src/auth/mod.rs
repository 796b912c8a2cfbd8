//! Authentication and authorization at the broker's edge: which token a
//! connection is, whether it may publish or subscribe, and live reloads of
//! the auth bundle. The decisions themselves are pure functions in
//! `starling_model::acl`; this module holds the current bundle and applies
//! it to connections.

pub mod limiter;
pub mod store;
pub mod watch;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use starling_model::acl::{AuthError, AuthState, Principal};
use starling_model::bundle::AuthBundle;
use starling_model::config::BrokerConfig;
use tokio::sync::Notify;

use crate::metrics::{self, Metrics};
pub use limiter::FailureLimiter;

/// Why a connection was not let in.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    BadToken(#[from] AuthError),
    #[error("anonymous access is not allowed from this address")]
    AnonymousNotAllowed,
    #[error("too many failed authentications from this address and username")]
    RateLimited,
}

/// The auth bundle in force plus the failure limiter.
#[derive(Debug)]
pub struct AuthHub {
    state: RwLock<Arc<AuthState>>,
    limiter: FailureLimiter,
    anonymous: starling_model::config::Anonymous,
    /// Woken when the bundle changes (the expiry timer re-plans).
    pub changed: Notify,
    /// The bytes of the bundle last put in force, so the same content from
    /// a second source is not applied (and every client re-checked) twice.
    last_bytes: Mutex<Vec<u8>>,
    /// The bundle Secret is being watched through the API server and is
    /// current: the mounted file, which lags, is then not read.
    api_live: AtomicBool,
    /// Held across read, edit, write and apply of the bundle file by the
    /// admin API, so two concurrent edits cannot both start from the same
    /// file and lose one another's change.
    pub edits: tokio::sync::Mutex<()>,
}

impl AuthHub {
    /// No bundle: everything allowed (subject to the anonymous mode).
    pub fn open(cfg: &BrokerConfig) -> Self {
        Self::with_state(cfg, AuthState::open(cfg.broker.name.clone()))
    }

    pub fn with_state(cfg: &BrokerConfig, state: AuthState) -> Self {
        AuthHub {
            state: RwLock::new(Arc::new(state)),
            limiter: FailureLimiter::new(
                cfg.auth.max_failures_per_minute,
                cfg.auth.max_failures_per_address_per_minute,
            ),
            anonymous: cfg.auth.anonymous,
            changed: Notify::new(),
            last_bytes: Mutex::new(Vec::new()),
            api_live: AtomicBool::new(false),
            edits: tokio::sync::Mutex::new(()),
        }
    }

    pub fn current(&self) -> Arc<AuthState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a new bundle in force; returns the one it replaced.
    pub fn replace(&self, new: AuthState) -> Arc<AuthState> {
        let old = std::mem::replace(
            &mut *self.state.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(new),
        );
        self.changed.notify_one();
        old
    }

    /// Are these bundle bytes different from the ones last put in force?
    pub fn is_new(&self, bytes: &[u8]) -> bool {
        *self.last_bytes.lock().unwrap_or_else(|e| e.into_inner()) != bytes
    }

    pub fn remember(&self, bytes: &[u8]) {
        let mut last = self.last_bytes.lock().unwrap_or_else(|e| e.into_inner());
        last.clear();
        last.extend_from_slice(bytes);
    }

    /// The bundle in force as a document (for the admin API's lists);
    /// `None` when the broker runs without one.
    pub fn bundle_in_force(&self) -> Option<AuthBundle> {
        let bytes = self.last_bytes.lock().unwrap_or_else(|e| e.into_inner());
        if bytes.is_empty() {
            return None;
        }
        // These bytes were put in force, so they parsed then; parse cannot
        // fail now, and `None` is the honest answer if it ever did.
        AuthBundle::parse(&bytes).ok()
    }

    /// The failure limiter, shared with the admin API's Basic check.
    pub fn limiter(&self) -> &FailureLimiter {
        &self.limiter
    }

    pub fn api_live(&self) -> bool {
        self.api_live.load(Ordering::Relaxed)
    }

    pub fn set_api_live(&self, live: bool) {
        self.api_live.store(live, Ordering::Relaxed);
    }

    /// Decides who a CONNECT is. `password: None` asks for anonymous access.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        peer: IpAddr,
        metrics: &Metrics,
    ) -> Result<Arc<Principal>, Refusal> {
        let now = Instant::now();
        if self.limiter.is_blocked(peer, username, now) {
            metrics::inc(&metrics.auth_failures);
            return Err(Refusal::RateLimited);
        }
        let result = match password {
            None if crate::session::handshake::anonymous_allowed(self.anonymous, peer) => {
                Ok(self.current().anonymous())
            }
            None => Err(Refusal::AnonymousNotAllowed),
            Some(secret) => self
                .current()
                .authenticate(username, secret, SystemTime::now())
                .map_err(Refusal::from),
        };
        if result.is_err() {
            metrics::inc(&metrics.auth_failures);
            self.limiter.record_failure(peer, username, now);
        }
        result
    }
}
