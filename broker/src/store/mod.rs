//! Broker state that outlives the process, behind one narrow interface.
//!
//! The in-memory structures (sessions, router, retained store, last-value
//! cache) stay the source of truth while the broker runs; a [`StateStore`]
//! is told about every change to the parts that must survive a restart, as
//! an ordered stream of [`Op`]s, and hands each a [`Ticket`]. Whoever
//! acknowledges something to a client (a PUBACK, a PUBREC, an HTTP 200)
//! first waits for that ticket to be durable. At startup the store's
//! [`Snapshot`] rebuilds the in-memory state.
//!
//! An op stream rather than a table API keeps the interface narrow enough
//! for three backends: memory-only ([`memory`]), the embedded store on the
//! data directory ([`embedded`]), and later NATS JetStream for brokers that
//! share state.

pub mod embedded;
pub mod memory;
pub mod records;
pub mod restore;
mod tickets;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use starling_codec::{ByteString, QoS};

use crate::router::{Message, SubIds};
pub use records::{SessionRecord, StoredSub, StoredWill};

/// Position of an op in the store's stream; 0 is "nothing to wait for".
pub type Ticket = u64;

/// A future a connection awaits before sending an acknowledgement.
pub type Durable<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// One change to persistent state.
#[derive(Debug, Clone)]
pub enum Op {
    /// A retained message set (`Some`) or cleared (`None`).
    Retain {
        topic: ByteString,
        msg: Option<Message>,
    },
    /// The last-value cache's value for a topic, or its removal.
    LastValue {
        topic: ByteString,
        msg: Option<Message>,
    },
    /// A persistent session created or changed (expiry, will, connected or
    /// not): the whole record, which is small.
    Session {
        id: Arc<str>,
        record: Arc<SessionRecord>,
    },
    /// A session and everything it holds (subscriptions, queue) is gone.
    EndSession { id: Arc<str> },
    /// A subscription of a persistent session added or changed.
    Subscribe { session: Arc<str>, sub: StoredSub },
    /// A subscription removed (by the filter the client used).
    Unsubscribe { session: Arc<str>, filter: String },
    /// A QoS 1/2 message queued for a persistent session. The first
    /// session to queue a message carries its body (`msg`), which is
    /// stored once however many sessions queue it; until [`Op::Routed`]
    /// the body is kept even if every entry is acknowledged meanwhile, so
    /// the sessions still being routed to can refer to it.
    Enqueue {
        session: Arc<str>,
        seq: u64,
        entry: QueueEntry,
        msg: Option<Message>,
    },
    /// Routing of the message with this payload id is finished.
    Routed { payload: u64 },
    /// The queue entry's delivery state changed (QoS 2: sent with `pkid`,
    /// or PUBREC received and PUBREL sent).
    Delivery {
        session: Arc<str>,
        seq: u64,
        entry: QueueEntry,
    },
    /// Acknowledged, expired or dropped: the entry and, with its last
    /// reference, the payload go.
    Dequeue {
        session: Arc<str>,
        seq: u64,
        payload: u64,
    },
    /// An incoming QoS 2 packet id was PUBRECed (`true`) or released.
    Qos2In {
        session: Arc<str>,
        pkid: u16,
        present: bool,
    },
}

/// A queued message of one session, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub payload: u64,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: SubIds,
    /// QoS 2 only, once sent: the packet id it went out with (0: not sent).
    pub pkid: u16,
    /// QoS 2: PUBREC received, PUBREL sent.
    pub released: bool,
}

/// Where a delivery is in its session's stored queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRef {
    pub seq: u64,
    pub payload: u64,
}

/// The tickets a connection (or request) must see durable before it
/// acknowledges what it did: the first and the last, since a failed batch
/// anywhere between fails the acknowledgement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TicketSpan {
    pub first: Ticket,
    pub last: Ticket,
}

impl TicketSpan {
    pub fn note(&mut self, t: Ticket) {
        if t == 0 {
            return;
        }
        if self.first == 0 {
            self.first = t;
        }
        self.last = self.last.max(t);
    }

    pub fn join(&mut self, other: TicketSpan) {
        self.note(other.first);
        self.note(other.last);
    }

    pub fn is_empty(&self) -> bool {
        self.last == 0
    }
}

/// The payload id of a message being routed, shared by every session that
/// queues it, and the tickets its ops got.
#[derive(Debug, Default)]
pub struct Routing {
    pub payload: Option<u64>,
    pub span: TicketSpan,
}

/// What the store held at startup.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub retained: Vec<Message>,
    pub last_values: Vec<Message>,
    pub sessions: Vec<RestoredSession>,
    /// Payload ids already used: new ones start above.
    pub max_payload_id: u64,
    /// Records dropped because they expired while the broker was down.
    pub expired: usize,
    /// Records dropped as unreadable (only with `--recover-store`).
    pub unreadable: usize,
}

#[derive(Debug)]
pub struct RestoredSession {
    pub id: Arc<str>,
    pub record: SessionRecord,
    pub subscriptions: Vec<StoredSub>,
    /// In queue order.
    pub queue: Vec<(u64, QueueEntry, Message)>,
    pub incoming_qos2: Vec<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store in {path} cannot be opened: {reason}; start with --recover-store to keep what is consistent and set the rest aside"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("the store in {path} is in use by another broker process")]
    Locked { path: PathBuf },
    #[error("cannot prepare the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store could not write (disk full or failing): {0}")]
    Write(String),
    #[error("the store is shut down")]
    Closed,
}

/// The interface every backend implements. Ops are applied in the order of
/// their tickets; [`StateStore::durable`] resolves once every op up to a
/// ticket is safe under the configured durability, or failed.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// False for memory-only: callers then build no ops at all.
    fn persists(&self) -> bool;
    /// Queues `op` for writing and returns its ticket. Never blocks on I/O.
    fn submit(&self, op: Op) -> Ticket;
    /// Resolves when every ticket of `span` (and every earlier one) is
    /// durable, or with an error if any of them failed.
    fn durable(&self, span: TicketSpan) -> Durable<'_>;
    /// Is `ticket` durable already (no need to wait)?
    fn is_durable(&self, ticket: Ticket) -> bool;
    /// Ops submitted and not yet written: publishers of retained QoS 0
    /// messages (which wait for no ticket) pause while it is large.
    fn backlog(&self) -> usize;
    /// False while writes fail (disk full): QoS 1/2 publishes that would be
    /// stored are refused instead of accepted and lost.
    fn healthy(&self) -> bool;
    /// A fresh payload id.
    fn payload_id(&self) -> u64;
    /// Everything stored, read once at startup.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Writes what is pending and stops the writer.
    fn close(&self);
}

/// Opens the store the configuration asks for: embedded on the data
/// directory, or memory-only.
pub fn open(
    config: &starling_model::config::StorageConfig,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Arc<dyn StateStore>, StoreError> {
    match &config.data_dir {
        Some(dir) if config.persists() => Ok(Arc::new(embedded::Embedded::open(
            dir,
            config,
            config.recover,
            metrics,
        )?)),
        _ => Ok(Arc::new(memory::MemoryStore)),
    }
}
