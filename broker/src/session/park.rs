//! Idle plain-TCP connections parked outside any task.
//!
//! A connection's task is as large as its largest state (the packet loop,
//! its timers and select arms: about 2 KB), and tokio keeps that cell for
//! the task's whole life. Most connections of an IoT fleet are idle almost
//! all the time, so a connection that has neither read nor written for
//! [`PARK_AFTER`] hands its state (`Live`: the connection, its socket and
//! guards, a few hundred bytes) to the parker and its task ends. The parker
//! holds it in a slot with a waker of its own registered on the socket's
//! readiness and on the session's [`ConnLink`](super::state::ConnLink);
//! the first of a readable socket, a delivery or kick, a lapsed keep-alive
//! or the broker's shutdown spawns a new task that carries on where the
//! old one stopped.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::connection::{self, Live};
use crate::listen::transport::TcpTransport;

/// A connection quiet (nothing read, nothing written) for this long is
/// parked. Long enough that a client sending a few messages a second never
/// is; short enough that a fleet reporting every few seconds mostly is.
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);
/// How often lapsed keep-alives of parked connections are looked for: the
/// spec allows 1.5 × the keep-alive, so a second late is within it.
const KEEPALIVE_SCAN: Duration = Duration::from_secs(1);

/// The parked connections; one per broker, shared by every listener.
#[derive(Default)]
pub struct Parker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    slots: Mutex<Slots<Parked>>,
    /// Slots whose waker fired, for the parker's task to resume.
    ready: Mutex<Vec<(u32, u32)>>,
    woken: Notify,
}

/// Slots addressed by (index, generation), reused through a free list.
/// Generic over what they hold so that the bookkeeping is tested without
/// a connection.
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

struct Entry<P> {
    /// Bumped on every removal, so a stale waker cannot resume a later
    /// occupant of the slot.
    generation: u32,
    parked: Option<P>,
}

/// When a parked connection's keep-alive lapses (None: never).
trait Lapses {
    fn lapses_at(&self) -> Option<Instant>;
}

impl Lapses for Parked {
    fn lapses_at(&self) -> Option<Instant> {
        self.deadline
    }
}

struct Parked {
    live: Box<Live<TcpTransport>>,
    since: Instant,
    /// When the keep-alive lapses (None: the client asked for none).
    deadline: Option<Instant>,
}

/// The waker of one slot: queues it for resumption.
struct SlotWaker {
    inner: Arc<Inner>,
    index: u32,
    generation: u32,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.inner.mark_ready(self.index, self.generation);
    }
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, Slots<Parked>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_ready(&self, index: u32, generation: u32) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((index, generation));
        self.woken.notify_one();
    }
}

impl<P: Lapses> Slots<P> {
    fn insert(&mut self, p: P) -> (u32, u32) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    generation: 0,
                    parked: None,
                });
                (self.entries.len() - 1) as u32
            }
        };
        let e = &mut self.entries[index as usize];
        e.parked = Some(p);
        (index, e.generation)
    }

    fn remove(&mut self, index: u32, generation: u32) -> Option<P> {
        let e = self.entries.get_mut(index as usize)?;
        if e.generation != generation {
            return None;
        }
        let p = e.parked.take()?;
        e.generation = e.generation.wrapping_add(1);
        self.free.push(index);
        Some(p)
    }

    /// The slots whose keep-alive lapsed by `now` (all of them with
    /// `everything`).
    fn due(&self, now: Instant, everything: bool) -> Vec<(u32, u32)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let p = e.parked.as_ref()?;
                (everything || p.lapses_at().is_some_and(|d| d <= now))
                    .then_some((i as u32, e.generation))
            })
            .collect()
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
    /// Connections parked now (for tests and the idle-memory profile).
    pub fn len(&self) -> usize {
        let s = self.inner.slots();
        s.entries.len() - s.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `live` out of its task until something needs it. Whatever
    /// happened since its task last looked (a readable socket, a pending
    /// wake) resumes it at once.
    pub(super) fn park(&self, live: Box<Live<TcpTransport>>) {
        let deadline = live.keepalive_deadline();
        let link = live.link().clone();
        let mut slots = self.inner.slots();
        if slots.closed {
            drop(slots);
            tokio::spawn(connection::drive(live));
            return;
        }
        let (index, generation) = slots.insert(Parked {
            live,
            since: Instant::now(),
            deadline,
        });
        let waker = Waker::from(Arc::new(SlotWaker {
            inner: self.inner.clone(),
            index,
            generation,
        }));
        let readable = slots.entries[index as usize]
            .parked
            .as_ref()
            .is_some_and(|p| {
                // No stale readiness to fear: the task parks from its
                // select, whose read cleared it (see `TcpTransport`), so
                // "ready" here means input arrived since.
                p.live
                    .transport()
                    .stream()
                    .poll_read_ready(&mut Context::from_waker(&waker))
                    .is_ready()
            });
        let pending = link.park(&waker);
        drop(slots);
        if readable || pending {
            self.inner.mark_ready(index, generation);
        }
    }

    /// Resumes parked connections as they are woken, when their keep-alive
    /// lapses, and all of them at shutdown (after which nothing parks).
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut scan = tokio::time::interval(KEEPALIVE_SCAN);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = false;
        loop {
            let due = tokio::select! {
                _ = self.inner.woken.notified() => Vec::new(),
                _ = scan.tick() => self.inner.slots().due(Instant::now(), false),
                _ = shutdown.changed(), if !closed => {
                    closed = true;
                    let mut slots = self.inner.slots();
                    slots.closed = true;
                    slots.due(Instant::now(), true)
                }
            };
            let woken =
                std::mem::take(&mut *self.inner.ready.lock().unwrap_or_else(|e| e.into_inner()));
            self.resume(due);
            self.resume(woken);
        }
    }

    fn resume(&self, which: Vec<(u32, u32)>) {
        for (index, generation) in which {
            let parked = self.inner.slots().remove(index, generation);
            if let Some(mut p) = parked {
                p.live.resumed_after(p.since.elapsed());
                let link = p.live.link();
                link.unpark();
                // The wake that resumed it (or the one `park` consumed) is
                // for the connection's loop: it looks at kicks and re-checks
                // only when woken.
                link.wake.notify_one();
                tokio::spawn(connection::drive(p.live));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Stub(Option<Instant>);

    impl Lapses for Stub {
        fn lapses_at(&self) -> Option<Instant> {
            self.0
        }
    }

    #[test]
    fn a_stale_waker_cannot_resume_the_next_occupant() {
        let mut s = Slots::default();
        let (i, g) = s.insert(Stub(None));
        assert!(s.remove(i, g).is_some());
        assert!(s.remove(i, g).is_none(), "removed twice");
        let (j, h) = s.insert(Stub(None));
        assert_eq!(j, i, "the slot is reused");
        assert_ne!(h, g);
        assert!(
            s.remove(i, g).is_none(),
            "the old generation woke the new occupant"
        );
        assert!(s.remove(j, h).is_some());
        assert!(s.remove(99, 0).is_none());
    }

    #[test]
    fn due_lists_lapsed_keepalives_or_everything() {
        let now = Instant::now();
        let mut s = Slots::default();
        let past = s.insert(Stub(Some(now - Duration::from_secs(1))));
        let at = s.insert(Stub(Some(now)));
        let future = s.insert(Stub(Some(now + Duration::from_secs(1))));
        let never = s.insert(Stub(None));
        assert_eq!(s.due(now, false), vec![past, at]);
        assert_eq!(s.due(now, true), vec![past, at, future, never]);
        s.remove(past.0, past.1);
        assert_eq!(s.due(now, false), vec![at]);
    }
}
