//! Idle plain-TCP connections parked outside any task.
//!
//! A connection's task is as large as its largest state (the packet loop,
//! its timers and select arms: about 2 KB), and tokio keeps that cell for
//! the task's whole life. Most connections of an IoT fleet are idle almost
//! all the time, so a connection that has neither read nor written for
//! [`PARK_AFTER`] is folded into its compact form ([`Dormant`]) and its
//! task ends. The parker holds it in a slot, with its socket taken out of
//! tokio's reactor and watched in an epoll set of the parker's own (one
//! registration in the kernel instead of 256 bytes in the broker), and
//! with the session's [`ConnLink`](super::state::ConnLink) pointing at the
//! slot. The first of a readable socket, a delivery or kick, a lapsed
//! keep-alive or the broker's shutdown unfolds it into a new task that
//! carries on where the old one stopped.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mio::unix::SourceFd;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connection::{self, Live};
use super::dormant::Dormant;
use crate::listen::transport::TcpTransport;

/// A connection quiet (nothing read, nothing written) for this long is
/// parked. Long enough that a client sending a few messages a second never
/// is; short enough that a fleet reporting every few seconds mostly is.
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);
/// How often lapsed keep-alives of parked connections are looked for: the
/// spec allows 1.5 × the keep-alive, so a second late is within it.
const KEEPALIVE_SCAN: Duration = Duration::from_secs(1);
/// Readiness events taken from the epoll set per call.
const EVENTS: usize = 1024;
/// A slot's lapse that never comes (no keep-alive).
const NEVER: u32 = u32::MAX;
/// Lapses are kept in tenths of a second since the parker started: four
/// bytes a slot, and a long way from wrapping (13 years).
const TICK_MS: u128 = 100;
/// [`PARK_AFTER`] in ticks.
const PARK_AFTER_TICKS: u32 = (PARK_AFTER.as_millis() / TICK_MS) as u32;

// A slot's key (generation and index) is the epoll token: it must fit.
const _: () = assert!(usize::BITS >= 64);

/// The parked connections; one per broker, shared by every listener.
/// `None` when its epoll set could not be made: connections then keep
/// their tasks.
pub struct Parker {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    slots: Mutex<Slots<Box<Dormant>>>,
    ready: Arc<Ready>,
    /// Where parked sockets are registered (and deregistered on resume).
    registry: mio::Registry,
    /// The epoll set itself, taken by the parker's task.
    poll: Mutex<Option<mio::Poll>>,
    epoch: Instant,
}

/// Keys of parked connections whose link was woken (a delivery, a kick, a
/// re-check), for the parker's task to resume.
#[derive(Debug, Default)]
pub struct Ready {
    keys: Mutex<Vec<u64>>,
    woken: Notify,
}

impl Ready {
    pub fn push(&self, key: u64) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key);
        self.woken.notify_one();
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Slots addressed by a key of (generation, index), reused through a free
/// list. Generic over what they hold so that the bookkeeping is tested
/// without a connection.
struct Slots<P> {
    entries: Vec<Entry<P>>,
    free: Vec<u32>,
    /// Shutdown started: nothing is parked any more.
    closed: bool,
}

impl<P> Default for Slots<P> {
    fn default() -> Self {
        Slots {
            entries: Vec::new(),
            free: Vec::new(),
            closed: false,
        }
    }
}

/// Sixteen bytes a slot: the keep-alive scan reads `lapse` without
/// touching the parked connection.
struct Entry<P> {
    /// Never zero (so no key is), and bumped on every removal, so a stale
    /// key cannot resume a later occupant of the slot.
    generation: u32,
    /// When the keep-alive lapses, in ticks ([`NEVER`]: it does not).
    lapse: u32,
    parked: Option<P>,
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

impl<P> Slots<P> {
    fn insert(&mut self, p: P, lapse: u32) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    generation: 1,
                    lapse: NEVER,
                    parked: None,
                });
                (self.entries.len() - 1) as u32
            }
        };
        let e = &mut self.entries[index as usize];
        e.parked = Some(p);
        e.lapse = lapse;
        key(index, e.generation)
    }

    fn remove(&mut self, key: u64) -> Option<P> {
        let (index, generation) = (key as u32, (key >> 32) as u32);
        let e = self.entries.get_mut(index as usize)?;
        if e.generation != generation {
            return None;
        }
        let p = e.parked.take()?;
        e.generation = e.generation.wrapping_add(1).max(1);
        self.free.push(index);
        Some(p)
    }

    /// The keys of the slots whose keep-alive lapsed by tick `now` (all of
    /// them with `everything`).
    fn due(&self, now: u32, everything: bool) -> Vec<u64> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.parked.is_some() && (everything || (e.lapse != NEVER && e.lapse <= now))
            })
            .map(|(i, e)| key(i as u32, e.generation))
            .collect()
    }

    fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}

impl Inner {
    fn new() -> std::io::Result<Inner> {
        let poll = mio::Poll::new()?;
        Ok(Inner {
            slots: Mutex::default(),
            ready: Arc::default(),
            registry: poll.registry().try_clone()?,
            poll: Mutex::new(Some(poll)),
            epoch: Instant::now(),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Slots<Box<Dormant>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `t` in ticks, rounded down (a time that has come) or up (a deadline
    /// not to act on early).
    fn tick(&self, t: Instant, up: bool) -> u32 {
        let ms = t.saturating_duration_since(self.epoch).as_millis();
        let ticks = if up {
            ms.div_ceil(TICK_MS)
        } else {
            ms / TICK_MS
        };
        ticks.min(u128::from(NEVER - 1)) as u32
    }

    fn watch(&self, fd: std::os::fd::RawFd, key: u64) -> std::io::Result<()> {
        self.registry.register(
            &mut SourceFd(&fd),
            mio::Token(key as usize),
            mio::Interest::READABLE,
        )
    }

    /// Takes the connection out of its slot and hands it to a new task.
    fn resume(&self, key: u64) {
        let Some(d) = self.slots().remove(key) else {
            return;
        };
        // Out of the parker's set before the reactor takes the socket; a
        // socket that was never registered (see `park`) is not in it.
        let _ = self
            .registry
            .deregister(&mut SourceFd(&d.socket().as_raw_fd()));
        d.link().unpark();
        let long = self.tick(Instant::now(), false).saturating_sub(d.since) >= PARK_AFTER_TICKS;
        tokio::spawn(connection::drive(d.unfold(long)));
    }
}

impl Default for Parker {
    fn default() -> Self {
        match Inner::new() {
            Ok(inner) => Parker {
                inner: Some(Arc::new(inner)),
            },
            Err(e) => {
                tracing::warn!(error = %e, "idle connections will not be parked: the parker's epoll set could not be created");
                Parker { inner: None }
            }
        }
    }
}

impl std::fmt::Debug for Parker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parker")
            .field("parked", &self.len())
            .finish()
    }
}

impl Parker {
    /// Connections parked now (for the gauge, tests and the idle-memory
    /// profile).
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.slots().len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The queue a connection's link tells the parker of wakes through
    /// (`None`: nothing is parked).
    pub fn ready(&self) -> Option<Arc<Ready>> {
        self.inner.as_ref().map(|i| i.ready.clone())
    }

    /// Takes `live` out of its task until something needs it, or hands it
    /// back (no parking: shutdown started, or there is no epoll set).
    /// Whatever happened since its task last looked (input that arrived, a
    /// pending wake) resumes it at once.
    pub(super) fn park(&self, live: Box<Live<TcpTransport>>) -> Option<Box<Live<TcpTransport>>> {
        let Some(inner) = &self.inner else {
            return Some(live);
        };
        let mut slots = inner.slots();
        if slots.closed || !live.conn.link.parks() {
            return Some(live);
        }
        let dormant = match Dormant::fold(live, inner.tick(Instant::now(), false)) {
            Ok(d) => d,
            Err(severed) => {
                drop(slots);
                tokio::spawn(connection::drive(severed));
                return None;
            }
        };
        let lapse = dormant
            .keepalive_deadline()
            .map_or(NEVER, |d| inner.tick(d, true));
        let link = dormant.link().clone();
        let fd = dormant.socket().as_raw_fd();
        let key = slots.insert(dormant, lapse);
        // Registering reports input that is already there (epoll checks
        // at once), so nothing that arrived since the task's last read is
        // missed.
        let watched = inner.watch(fd, key);
        let pending = link.park(key);
        drop(slots);
        if pending {
            // `park` took the permit the connection's loop looks for.
            link.wake.notify_one();
        }
        if let Err(e) = watched {
            // Once: the cause (the kernel's epoll limits) is the same for
            // every connection, and each would try again every second.
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "idle connections cannot be parked: their sockets could not be watched; they keep their tasks");
            } else {
                tracing::debug!(error = %e, "an idle connection's socket could not be watched; it keeps its task");
            }
            inner.resume(key);
        } else if pending {
            inner.ready.push(key);
        }
        None
    }

    /// Resumes parked connections as their sockets become readable, as
    /// their links are woken, when their keep-alive lapses, and all of them
    /// at shutdown (after which nothing parks).
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        let Some(poll) = inner.poll.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        // SAFETY: `mio::Poll` owns its epoll descriptor and closes it only
        // when dropped, which the `AsyncFd` owning it does last; its
        // `as_raw_fd` always returns that one descriptor.
        let set = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) };
        let mut set = match set {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "idle connections will not be parked: the parker's epoll set could not be watched");
                inner.slots().closed = true;
                return;
            }
        };
        let mut events = mio::Events::with_capacity(EVENTS);
        let mut scan = tokio::time::interval(KEEPALIVE_SCAN);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = false;
        loop {
            let mut due = Vec::new();
            tokio::select! {
                _ = inner.ready.woken.notified() => {}
                guard = set.readable_mut() => {
                    let Ok(mut guard) = guard else {
                        return;
                    };
                    loop {
                        if let Err(e) = guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                            if e.kind() == std::io::ErrorKind::Interrupted {
                                continue;
                            }
                            tracing::warn!(error = %e, "the parker could not read its epoll set");
                        }
                        let before = due.len();
                        due.extend(events.iter().map(|e| e.token().0 as u64));
                        if due.len() - before < EVENTS {
                            guard.clear_ready();
                            break;
                        }
                    }
                }
                _ = scan.tick() => {
                    due = inner.slots().due(inner.tick(Instant::now(), false), false);
                }
                _ = shutdown.changed(), if !closed => {
                    closed = true;
                    let mut slots = inner.slots();
                    slots.closed = true;
                    due = slots.due(0, true);
                }
            }
            due.extend(inner.ready.take());
            for key in due {
                inner.resume(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_key_cannot_resume_the_next_occupant() {
        let mut s = Slots::default();
        let k = s.insert("a", NEVER);
        assert_ne!(k, 0, "zero means not parked");
        assert_eq!(s.remove(k), Some("a"));
        assert_eq!(s.remove(k), None, "removed twice");
        let j = s.insert("b", NEVER);
        assert_eq!(j as u32, k as u32, "the slot is reused");
        assert_ne!(j, k);
        assert_eq!(s.remove(k), None, "the old key woke the new occupant");
        assert_eq!(s.len(), 1);
        assert_eq!(s.remove(j), Some("b"));
        assert_eq!(s.remove(key(99, 1)), None);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn generations_skip_zero_when_they_wrap() {
        let mut s = Slots::default();
        let k = s.insert((), NEVER);
        s.entries[0].generation = u32::MAX;
        let k = key(k as u32, u32::MAX);
        assert!(s.remove(k).is_some());
        let j = s.insert((), NEVER);
        assert_eq!(j >> 32, 1, "generation 0 would make key 0 for slot 0");
    }

    #[test]
    fn due_lists_lapsed_keepalives_or_everything() {
        let mut s = Slots::default();
        let past = s.insert((), 9);
        let at = s.insert((), 10);
        let future = s.insert((), 11);
        let never = s.insert((), NEVER);
        assert_eq!(s.due(10, false), vec![past, at]);
        assert_eq!(s.due(10, true), vec![past, at, future, never]);
        s.remove(past);
        assert_eq!(s.due(10, false), vec![at]);
        assert_eq!(s.due(NEVER - 1, false), vec![at, future]);
    }

    #[test]
    fn deadlines_round_up_and_the_present_down() {
        let inner = Inner::new().expect("an epoll set");
        let t = inner.epoch + Duration::from_millis(1_050);
        assert_eq!(inner.tick(t, true), 11, "a lapse is not acted on early");
        assert_eq!(inner.tick(t, false), 10);
        assert_eq!(inner.tick(inner.epoch - Duration::from_secs(1), false), 0);
        let far = inner.epoch + Duration::from_secs(20 * 365 * 86_400);
        assert_eq!(inner.tick(far, true), NEVER - 1, "saturates short of NEVER");
    }

    #[test]
    fn a_slot_entry_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Entry<Box<Dormant>>>(), 16);
    }
}
