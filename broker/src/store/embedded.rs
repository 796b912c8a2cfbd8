//! The embedded store: fjall (an LSM tree with a write-ahead journal) under
//! `<data dir>/store`, written by one thread with group commit.
//!
//! Connections never wait for the disk to submit an op: they push it on a
//! shared list and get a ticket. The writer takes everything that arrived
//! while it wrote the previous batch (so batches grow with load by
//! themselves), folds ops that cancel out (a message queued and
//! acknowledged within the same batch is never written), commits once,
//! syncs per the durability mode, and settles the batch's tickets.
//!
//! fjall was chosen over redb on this write pattern (BENCHMARKS.md "Store
//! choice"): faster group commits at every batch size, and its buffered
//! mode keeps written batches across a `kill -9`, which `os` durability
//! promises.

use std::collections::hash_map::Entry;

// The writer hashes every key of every batch: foldhash (seeded per
// process, so client-chosen ids cannot be aimed at one bucket) is several
// times cheaper than the standard SipHash there.
use foldhash::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use starling_model::config::{Durability, StorageConfig};

use super::records::{self, BadRecord};
use super::tickets::Tickets;
use super::{Durable, Op, RestoredSession, Snapshot, StateStore, StoreError, Ticket, TicketSpan};
use crate::metrics::{self, Metrics};

/// Keyspaces, by the byte used to tell them apart in a batch.
const RETAINED: u8 = 0;
const LVC: u8 = 1;
const SESSIONS: u8 = 2;
const PAYLOADS: u8 = 3;
const QUEUE: u8 = 4;
const QOS2: u8 = 5;
const SUBS: u8 = 6;
const NAMES: [&str; 7] = [
    "retained", "lvc", "sessions", "payloads", "queue", "qos2", "subs",
];

/// Largest in-memory table per keyspace before it is flushed to disk.
const MEMTABLE_BYTES: u64 = 1024 * 1024;

/// How long the writer waits before reopening the store after a failed write.
const REOPEN_EVERY: Duration = Duration::from_millis(500);

struct Db {
    db: Database,
    ks: Vec<Keyspace>,
}

impl Db {
    fn open(path: &Path) -> fjall::Result<Db> {
        let db = Database::builder(path)
            // The broker's own memory caps bound what is stored; a small
            // block cache is enough because the store is read once, at startup.
            .cache_size(8 * 1024 * 1024)
            .worker_threads(1)
            .max_journaling_size(64 * 1024 * 1024)
            .open()?;
        // fjall's default memtable is 64 MiB per keyspace, which would let
        // the broker's memory grow by hundreds of MiB before a flush; what
        // the store holds is bounded by the broker's caps and read only at
        // startup, so small memtables cost little.
        let ks = NAMES
            .iter()
            .map(|n| {
                db.keyspace(n, || {
                    KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
                })
            })
            .collect::<fjall::Result<Vec<_>>>()?;
        Ok(Db { db, ks })
    }
}

/// What is on disk for queues, kept in memory so that ending a session or
/// dropping a payload's last reference needs no read.
#[derive(Debug, Default)]
struct Index {
    /// Session id → sequence → payload id.
    queues: HashMap<Arc<str>, HashMap<u64, u64>>,
    qos2: HashMap<Arc<str>, HashSet<u16>>,
    /// Payload id → queue entries referring to it.
    refs: HashMap<u64, u32>,
}

impl Index {
    fn deref(&mut self, payload: u64) -> bool {
        match self.refs.get_mut(&payload) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.refs.remove(&payload);
                true
            }
            None => false,
        }
    }
}

/// One key's fate in a batch: the last write wins; `fresh` keys did not
/// exist before this batch, so removing them again writes nothing.
struct Change {
    value: Option<Vec<u8>>,
    fresh: bool,
}

#[derive(Default)]
struct Fold {
    changes: HashMap<(u8, Vec<u8>), Change>,
}

impl Fold {
    fn put(&mut self, ks: u8, key: Vec<u8>, value: Vec<u8>, fresh: bool) {
        let c = self
            .changes
            .entry((ks, key))
            .or_insert(Change { value: None, fresh });
        c.value = Some(value);
    }

    fn remove(&mut self, ks: u8, key: Vec<u8>) {
        match self.changes.entry((ks, key)) {
            Entry::Occupied(e) if e.get().fresh => {
                e.remove();
            }
            Entry::Occupied(mut e) => e.get_mut().value = None,
            Entry::Vacant(e) => {
                e.insert(Change {
                    value: None,
                    fresh: false,
                });
            }
        }
    }
}

#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    /// Ticket of `ops[0]` minus one: tickets already handed to the writer.
    taken: u64,
    closed: bool,
}

struct Inner {
    path: PathBuf,
    pending: Mutex<Pending>,
    wake: Condvar,
    tickets: Tickets,
    healthy: AtomicBool,
    payload_ids: AtomicU64,
    backlog: AtomicUsize,
    mode: PersistMode,
    delay: Duration,
    max_batch: usize,
    metrics: Arc<Metrics>,
}

impl Inner {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Embedded {
    inner: Arc<Inner>,
    snapshot: Mutex<Option<Snapshot>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn describe(e: &fjall::Error) -> String {
    match e {
        fjall::Error::Io(io) => io.to_string(),
        fjall::Error::JournalRecovery(r) => format!("its journal is damaged ({r})"),
        fjall::Error::Storage(s) => format!("a table file is damaged ({s})"),
        fjall::Error::InvalidVersion(_) => "it was written by an unknown format version".into(),
        other => format!("{other:?}"),
    }
}

impl Embedded {
    /// Opens (or creates) the store under `data_dir` and reads it. With
    /// `recover`, a store that cannot be opened is moved aside and what can
    /// be read of it is kept; without, the broker refuses to start.
    pub fn open(
        data_dir: &Path,
        config: &StorageConfig,
        recover: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Embedded, StoreError> {
        let path = data_dir.join("store");
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = match Db::open(&path) {
            Ok(db) => db,
            Err(fjall::Error::Locked) => return Err(StoreError::Locked { path }),
            Err(e) if recover => salvage(&path, &e)?,
            Err(e) => {
                return Err(StoreError::Corrupt {
                    reason: describe(&e),
                    path,
                });
            }
        };
        let (snapshot, index) = read_all(&db, &path, recover)?;
        let inner = Arc::new(Inner {
            path,
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            tickets: Tickets::default(),
            healthy: AtomicBool::new(true),
            payload_ids: AtomicU64::new(snapshot.max_payload_id),
            backlog: AtomicUsize::new(0),
            mode: match config.durability {
                Durability::Fsync => PersistMode::SyncAll,
                Durability::Os | Durability::Off => PersistMode::Buffer,
            },
            delay: Duration::from_micros(config.commit_delay_us),
            max_batch: config.max_batch.max(1),
            metrics,
        });
        let w = inner.clone();
        let writer = std::thread::Builder::new()
            .name("starling-store".into())
            .spawn(move || write_loop(&w, db, index))
            .map_err(|e| StoreError::Write(format!("cannot start the store writer: {e}")))?;
        Ok(Embedded {
            inner,
            snapshot: Mutex::new(Some(snapshot)),
            writer: Mutex::new(Some(writer)),
        })
    }
}

/// `--recover-store`: the damaged store is kept as `store.damaged-<ms>`; a
/// copy without its journal files (`*.jnl`, the writes not yet flushed to
/// table files) is opened, which keeps everything in the table files. If
/// even that fails the broker starts empty, and says so.
fn salvage(path: &Path, e: &fjall::Error) -> Result<Db, StoreError> {
    let aside = path.with_file_name(format!("store.damaged-{}", records::now_ms()));
    tracing::warn!(store = %path.display(), error = %describe(e), aside = %aside.display(), "the store cannot be opened; --recover-store keeps what is consistent and moves the original aside");
    let fail = |source| StoreError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::rename(path, &aside).map_err(fail)?;
    copy_dir(&aside, path, &|p: &Path| {
        p.extension().is_some_and(|e| e == "jnl")
    })
    .map_err(fail)?;
    match Db::open(path) {
        Ok(db) => Ok(db),
        Err(e2) => {
            tracing::warn!(store = %path.display(), error = %describe(&e2), "nothing of the store could be read; starting with an empty store (the original is kept aside)");
            std::fs::remove_dir_all(path).map_err(fail)?;
            Db::open(path).map_err(|e3| StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: describe(&e3),
            })
        }
    }
}

fn copy_dir(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let p = entry.path();
        if skip(&p) {
            continue;
        }
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&p, &dest, skip)?;
        } else {
            std::fs::copy(&p, &dest)?;
        }
    }
    Ok(())
}

/// Called with each key and value of a keyspace.
type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<(), BadRecord>;

/// Reads every keyspace into a snapshot, drops what expired while the
/// broker was down or has lost what it refers to, and builds the index.
fn read_all(db: &Db, path: &Path, recover: bool) -> Result<(Snapshot, Index), StoreError> {
    let now = records::now_ms();
    let mut snap = Snapshot::default();
    let mut index = Index::default();
    let mut drop_keys: Vec<(u8, Vec<u8>)> = Vec::new();
    let corrupt = |ks: u8, why: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: format!(
            "a record in {} is unreadable ({why})",
            NAMES[usize::from(ks)]
        ),
    };
    // Unreadable records stop the start, unless recovering: then they are
    // counted, dropped and logged.
    let mut unreadable = |ks: u8, bad: Vec<(Vec<u8>, BadRecord)>| -> Result<(), StoreError> {
        for (key, why) in bad {
            if !recover {
                return Err(corrupt(ks, why.0));
            }
            snap.unreadable += 1;
            drop_keys.push((ks, key));
        }
        Ok(())
    };
    let each = |ks: u8, f: Visit<'_>| {
        let mut bad = Vec::new();
        for kv in db.ks[usize::from(ks)].iter() {
            let (k, v) = kv.into_inner().map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: describe(&e),
            })?;
            if let Err(e) = f(&k, &v) {
                bad.push((k.to_vec(), e));
            }
        }
        Ok::<_, StoreError>(bad)
    };
    let mut expired: Vec<(u8, Vec<u8>)> = Vec::new();
    let decode_msgs = |ks: u8,
                       out: &mut Vec<crate::router::Message>,
                       expired: &mut Vec<(u8, Vec<u8>)>|
     -> Result<Vec<(Vec<u8>, BadRecord)>, StoreError> {
        each(ks, &mut |k, v| {
            match records::decode_message(v, now)? {
                Some(m) => out.push(m),
                None => expired.push((ks, k.to_vec())),
            }
            Ok(())
        })
    };
    let bad = decode_msgs(RETAINED, &mut snap.retained, &mut expired)?;
    unreadable(RETAINED, bad)?;
    let bad = decode_msgs(LVC, &mut snap.last_values, &mut expired)?;
    unreadable(LVC, bad)?;
    let mut payloads: HashMap<u64, crate::router::Message> = HashMap::default();
    let mut dead_payloads: HashSet<u64> = HashSet::default();
    let bad = each(PAYLOADS, &mut |k, v| {
        let id: [u8; 8] = k.try_into().map_err(|_| BadRecord("invalid payload key"))?;
        let id = u64::from_be_bytes(id);
        snap.max_payload_id = snap.max_payload_id.max(id);
        match records::decode_message(v, now)? {
            Some(m) => {
                payloads.insert(id, m);
            }
            None => {
                dead_payloads.insert(id);
            }
        }
        Ok(())
    })?;
    unreadable(PAYLOADS, bad)?;
    let mut sessions: HashMap<Arc<str>, RestoredSession> = HashMap::default();
    let bad = each(SESSIONS, &mut |k, v| {
        let id = std::str::from_utf8(k).map_err(|_| BadRecord("invalid session key"))?;
        let record = records::decode_session(v)?;
        let gone = record
            .disconnected_at_ms
            .is_some_and(|at| at.saturating_add(record.expiry_secs.saturating_mul(1000)) <= now);
        if gone {
            expired.push((SESSIONS, k.to_vec()));
        } else {
            let id: Arc<str> = Arc::from(id);
            sessions.insert(
                id.clone(),
                RestoredSession {
                    id,
                    record,
                    subscriptions: Vec::new(),
                    queue: Vec::new(),
                    incoming_qos2: Vec::new(),
                },
            );
        }
        Ok(())
    })?;
    unreadable(SESSIONS, bad)?;
    let mut orphans: Vec<(u8, Vec<u8>)> = Vec::new();
    let bad = each(SUBS, &mut |k, v| {
        let (id, _) = records::split_key(k)?;
        let sub = records::decode_sub(v)?;
        match sessions.get_mut(id) {
            Some(s) => s.subscriptions.push(sub),
            None => orphans.push((SUBS, k.to_vec())),
        }
        Ok(())
    })?;
    unreadable(SUBS, bad)?;
    let bad = each(QUEUE, &mut |k, v| {
        let (id, rest) = records::split_key(k)?;
        let seq: [u8; 8] = rest
            .try_into()
            .map_err(|_| BadRecord("invalid queue key"))?;
        let seq = u64::from_be_bytes(seq);
        let (entry, inline) = records::decode_entry_with(v)?;
        let inline = match inline {
            Some(b) => Some(records::decode_message(b, now)?),
            None => None,
        };
        let m = match &inline {
            Some(m) => m.as_ref(),
            None => payloads.get(&entry.payload),
        };
        let (Some(s), Some(m)) = (sessions.get_mut(id), m) else {
            // Its session ended or expired, or the message expired.
            orphans.push((QUEUE, k.to_vec()));
            return Ok(());
        };
        if inline.is_none() {
            *index.refs.entry(entry.payload).or_default() += 1;
        }
        index
            .queues
            .entry(s.id.clone())
            .or_default()
            .insert(seq, entry.payload);
        s.queue.push((seq, entry, m.clone()));
        Ok(())
    })?;
    unreadable(QUEUE, bad)?;
    let bad = each(QOS2, &mut |k, _| {
        let (id, rest) = records::split_key(k)?;
        let pkid: [u8; 2] = rest
            .try_into()
            .map_err(|_| BadRecord("invalid QoS 2 key"))?;
        let pkid = u16::from_be_bytes(pkid);
        match sessions.get_mut(id) {
            Some(s) => {
                s.incoming_qos2.push(pkid);
                index.qos2.entry(s.id.clone()).or_default().insert(pkid);
            }
            None => orphans.push((QOS2, k.to_vec())),
        }
        Ok(())
    })?;
    unreadable(QOS2, bad)?;
    // Payloads nobody refers to any more (their sessions ended or the
    // message expired) go too.
    let unused: Vec<u64> = payloads
        .keys()
        .chain(dead_payloads.iter())
        .filter(|id| !index.refs.contains_key(id))
        .copied()
        .collect();
    snap.expired = expired.len();
    let mut batch = db.db.batch().durability(Some(PersistMode::SyncAll));
    let mut n = 0;
    for (ks, k) in expired.into_iter().chain(orphans).chain(drop_keys) {
        batch.remove(&db.ks[usize::from(ks)], k);
        n += 1;
    }
    for id in unused {
        batch.remove(&db.ks[usize::from(PAYLOADS)], id.to_be_bytes().to_vec());
        n += 1;
    }
    if n > 0 {
        batch
            .commit()
            .map_err(|e| StoreError::Write(describe(&e)))?;
    }
    for s in sessions.values_mut() {
        s.queue.sort_unstable_by_key(|(seq, _, _)| *seq);
    }
    snap.sessions = sessions.into_values().collect();
    Ok((snap, index))
}

fn write_loop(inner: &Inner, mut db: Db, mut index: Index) {
    loop {
        let (ops, first) = {
            let mut p = inner.pending();
            while p.ops.is_empty() && !p.closed {
                p = inner.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.ops.is_empty() {
                return;
            }
            if !inner.delay.is_zero() && p.ops.len() < inner.max_batch && !p.closed {
                let (g, _) = inner
                    .wake
                    .wait_timeout(p, inner.delay)
                    .unwrap_or_else(|e| e.into_inner());
                p = g;
            }
            let rest = if p.ops.len() > inner.max_batch {
                p.ops.split_off(inner.max_batch)
            } else {
                Vec::new()
            };
            let ops = std::mem::replace(&mut p.ops, rest);
            let first = p.taken + 1;
            p.taken += ops.len() as u64;
            (ops, first)
        };
        let n = ops.len();
        inner.backlog.fetch_sub(n, Ordering::Relaxed);
        let last = first + n as u64 - 1;
        match commit(inner, &db, &mut index, ops) {
            Ok(()) => {
                metrics::inc(&inner.metrics.store_commits);
                inner.tickets.commit(last);
            }
            Err(e) => {
                metrics::inc(&inner.metrics.store_write_errors);
                inner.healthy.store(false, Ordering::Release);
                tracing::error!(store = %inner.path.display(), error = %describe(&e), "the store could not write; QoS 1/2 publishes are refused until it can");
                inner.tickets.fail(first, last);
                // A failed write poisons the database: reopen it (which
                // replays its journal) until that works, failing whatever
                // arrives meanwhile. The old handle goes first: it holds
                // the store's lock.
                drop(db);
                let Some((d, i)) = reopen(inner) else { return };
                db = d;
                index = i;
                inner.healthy.store(true, Ordering::Release);
                tracing::info!(store = %inner.path.display(), "the store writes again");
            }
        }
    }
}

fn reopen(inner: &Inner) -> Option<(Db, Index)> {
    loop {
        std::thread::sleep(REOPEN_EVERY);
        // What arrived in the meantime cannot be written: fail it.
        {
            let mut p = inner.pending();
            let n = p.ops.len();
            if n > 0 {
                let first = p.taken + 1;
                p.taken += n as u64;
                p.ops.clear();
                inner.backlog.fetch_sub(n, Ordering::Relaxed);
                inner.tickets.fail(first, first + n as u64 - 1);
            }
            if p.closed {
                return None;
            }
        }
        let opened = Db::open(&inner.path);
        if let Ok(db) = opened
            && let Ok((_, index)) = read_all(&db, &inner.path, true)
        {
            return Some((db, index));
        }
    }
}

/// A message body first stored in this batch, held back until its routing
/// is over: if exactly one QoS 1 entry refers to it then, it is written
/// inside that entry (one record instead of two, which is the common case
/// of fan-in to one persistent session).
struct FreshPayload {
    bytes: Vec<u8>,
    /// The first entry that refers to it.
    first: Option<(Arc<str>, u64, super::QueueEntry)>,
}

fn commit(inner: &Inner, db: &Db, index: &mut Index, ops: Vec<Op>) -> fjall::Result<()> {
    let mut fold = Fold::default();
    let mut fresh: HashMap<u64, FreshPayload> = HashMap::default();
    for op in ops {
        match op {
            Op::Retain { topic, msg } => match msg {
                Some(m) => fold.put(
                    RETAINED,
                    topic.as_bytes().to_vec(),
                    records::encode_message(&m),
                    false,
                ),
                None => fold.remove(RETAINED, topic.as_bytes().to_vec()),
            },
            Op::LastValue { topic, msg } => match msg {
                Some(m) => fold.put(
                    LVC,
                    topic.as_bytes().to_vec(),
                    records::encode_message(&m),
                    false,
                ),
                None => fold.remove(LVC, topic.as_bytes().to_vec()),
            },
            Op::Session { id, record } => fold.put(
                SESSIONS,
                id.as_bytes().to_vec(),
                records::encode_session(&record),
                false,
            ),
            Op::Subscribe { session, sub } => fold.put(
                SUBS,
                records::sub_key(&session, &sub.filter),
                records::encode_sub(&sub),
                false,
            ),
            Op::Unsubscribe { session, filter } => {
                fold.remove(SUBS, records::sub_key(&session, &filter));
            }
            Op::EndSession { id } => {
                fold.remove(SESSIONS, id.as_bytes().to_vec());
                // Its subscriptions: those on disk, and those added in this
                // batch (not on disk yet). Read here, once per ended session.
                let prefix = records::session_prefix(&id);
                for kv in db.ks[usize::from(SUBS)].prefix(&prefix) {
                    let (k, _) = kv.into_inner()?;
                    fold.remove(SUBS, k.to_vec());
                }
                let pending: Vec<Vec<u8>> = fold
                    .changes
                    .keys()
                    .filter(|(ks, k)| *ks == SUBS && k.starts_with(&prefix))
                    .map(|(_, k)| k.clone())
                    .collect();
                for k in pending {
                    fold.remove(SUBS, k);
                }
                for (seq, payload) in index.queues.remove(&id).unwrap_or_default() {
                    fold.remove(QUEUE, records::queue_key(&id, seq));
                    if index.deref(payload) {
                        fold.remove(PAYLOADS, payload.to_be_bytes().to_vec());
                    }
                }
                for pkid in index.qos2.remove(&id).unwrap_or_default() {
                    fold.remove(QOS2, records::qos2_key(&id, pkid));
                }
            }
            Op::Enqueue {
                session,
                seq,
                entry,
                msg,
            } => {
                if let Some(m) = msg
                    && !index.refs.contains_key(&entry.payload)
                {
                    fresh.insert(
                        entry.payload,
                        FreshPayload {
                            bytes: records::encode_message(&m),
                            first: Some((session.clone(), seq, entry.clone())),
                        },
                    );
                    // One reference for the routing still under way.
                    index.refs.insert(entry.payload, 1);
                }
                if !index.refs.contains_key(&entry.payload) {
                    // Its payload was in a batch that failed: nothing to refer to.
                    continue;
                }
                fold.put(
                    QUEUE,
                    records::queue_key(&session, seq),
                    records::encode_entry(&entry),
                    true,
                );
                *index.refs.entry(entry.payload).or_default() += 1;
                index
                    .queues
                    .entry(session)
                    .or_default()
                    .insert(seq, entry.payload);
            }
            Op::Routed { payload } => {
                if let Some(f) = fresh.remove(&payload) {
                    settle_fresh(&mut fold, index, payload, f);
                } else if index.deref(payload) {
                    fold.remove(PAYLOADS, payload.to_be_bytes().to_vec());
                }
            }
            Op::Delivery {
                session,
                seq,
                entry,
            } => {
                if index
                    .queues
                    .get(&session)
                    .is_some_and(|q| q.contains_key(&seq))
                {
                    fold.put(
                        QUEUE,
                        records::queue_key(&session, seq),
                        records::encode_entry(&entry),
                        false,
                    );
                }
            }
            Op::Dequeue {
                session,
                seq,
                payload,
            } => {
                let had = index
                    .queues
                    .get_mut(&session)
                    .is_some_and(|q| q.remove(&seq).is_some());
                if had {
                    fold.remove(QUEUE, records::queue_key(&session, seq));
                    if index.deref(payload) {
                        fold.remove(PAYLOADS, payload.to_be_bytes().to_vec());
                    }
                }
            }
            Op::Qos2In {
                session,
                pkid,
                present,
            } => {
                let key = records::qos2_key(&session, pkid);
                if present {
                    let fresh = index.qos2.entry(session).or_default().insert(pkid);
                    fold.put(QOS2, key, Vec::new(), fresh);
                } else if index
                    .qos2
                    .get_mut(&session)
                    .is_some_and(|s| s.remove(&pkid))
                {
                    fold.remove(QOS2, key);
                }
            }
        }
    }
    // Bodies whose routing ends in a later batch: written on their own.
    for (id, f) in fresh {
        fold.put(PAYLOADS, id.to_be_bytes().to_vec(), f.bytes, true);
    }
    if fold.changes.is_empty() {
        return Ok(());
    }
    let mut batch = db.db.batch().durability(Some(inner.mode));
    let mut bytes = 0u64;
    for ((ks, key), c) in fold.changes {
        let space = &db.ks[usize::from(ks)];
        bytes += key.len() as u64;
        match c.value {
            Some(v) => {
                bytes += v.len() as u64;
                batch.insert(space, key, v);
            }
            None => batch.remove(space, key),
        }
    }
    batch.commit()?;
    metrics::add(&inner.metrics.store_bytes_written, bytes);
    Ok(())
}

/// Routing of a body stored in this batch is over: nothing refers to it any
/// more (nothing to write), one QoS 1 entry does (the body goes inside it),
/// or several do (the body is written once, for all of them).
fn settle_fresh(fold: &mut Fold, index: &mut Index, payload: u64, f: FreshPayload) {
    let refs = index.refs.get(&payload).copied().unwrap_or(0);
    let single = match (&f.first, refs) {
        (Some((session, seq, entry)), 2) if entry.qos == starling_codec::QoS::AtLeastOnce => index
            .queues
            .get(session)
            .is_some_and(|q| q.get(seq) == Some(&payload))
            .then_some((session, *seq, entry)),
        _ => None,
    };
    match single {
        _ if refs <= 1 => {
            index.refs.remove(&payload);
        }
        Some((session, seq, entry)) => {
            // Held by the entry alone: no payload record, no reference count
            // (its dequeue finds none to drop).
            fold.put(
                QUEUE,
                records::queue_key(session, seq),
                records::encode_entry_with(entry, Some(&f.bytes)),
                true,
            );
            index.refs.remove(&payload);
        }
        None => {
            fold.put(PAYLOADS, payload.to_be_bytes().to_vec(), f.bytes, true);
            index.deref(payload);
        }
    }
}

impl StateStore for Embedded {
    fn persists(&self) -> bool {
        true
    }

    fn submit(&self, op: Op) -> Ticket {
        let mut p = self.inner.pending();
        if p.closed {
            return 0;
        }
        p.ops.push(op);
        let t = p.taken + p.ops.len() as u64;
        let first = p.ops.len() == 1;
        drop(p);
        self.inner.backlog.fetch_add(1, Ordering::Relaxed);
        if first {
            self.inner.wake.notify_one();
        }
        t
    }

    fn durable(&self, span: TicketSpan) -> Durable<'_> {
        Box::pin(self.inner.tickets.wait(span.first, span.last))
    }

    fn is_durable(&self, ticket: Ticket) -> bool {
        self.inner.tickets.is_done(ticket)
    }

    fn backlog(&self) -> usize {
        self.inner.backlog.load(Ordering::Relaxed)
    }

    fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    fn payload_id(&self) -> u64 {
        self.inner.payload_ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default())
    }

    fn close(&self) {
        {
            let mut p = self.inner.pending();
            p.closed = true;
        }
        self.inner.wake.notify_all();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        let last = self.inner.pending().taken;
        self.inner.tickets.close(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{Message, SubIds};
    use crate::store::{QueueEntry, SessionRecord};
    use starling_codec::{ByteString, QoS};

    fn config() -> StorageConfig {
        StorageConfig::default()
    }

    fn msg(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: ByteString::from(topic),
            payload: bytes::Bytes::copy_from_slice(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            origin: 0,
        }
    }

    fn entry(payload: u64) -> QueueEntry {
        QueueEntry {
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: SubIds::None,
            pkid: 0,
            released: false,
        }
    }

    fn record() -> Arc<SessionRecord> {
        Arc::new(SessionRecord {
            owner: None,
            expiry_secs: 3600,
            disconnected_at_ms: None,
            will: None,
        })
    }

    fn open(dir: &Path, recover: bool) -> Result<Embedded, StoreError> {
        Embedded::open(dir, &config(), recover, Arc::new(Metrics::default()))
    }

    async fn settle(s: &Embedded, t: Ticket) {
        s.durable(TicketSpan { first: t, last: t })
            .await
            .expect("written");
    }

    #[tokio::test]
    async fn fan_out_stores_one_payload_and_acknowledged_entries_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), false).unwrap();
        let id = s.payload_id();
        let body = msg("a/b", &[7; 1000]);
        let mut last = 0;
        for (i, name) in ["s1", "s2", "s3"].iter().enumerate() {
            s.submit(Op::Session {
                id: Arc::from(*name),
                record: record(),
            });
            last = s.submit(Op::Enqueue {
                session: Arc::from(*name),
                seq: 0,
                entry: entry(id),
                msg: (i == 0).then(|| body.clone()),
            });
        }
        last = last.max(s.submit(Op::Routed { payload: id }));
        settle(&s, last).await;
        // s1 acknowledged; s2's session ended; s3 still holds it.
        s.submit(Op::Dequeue {
            session: Arc::from("s1"),
            seq: 0,
            payload: id,
        });
        let t = s.submit(Op::EndSession {
            id: Arc::from("s2"),
        });
        settle(&s, t).await;
        s.close();
        drop(s);
        let s = open(dir.path(), false).unwrap();
        let snap = s.load().unwrap();
        let mut ids: Vec<_> = snap.sessions.iter().map(|r| r.id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["s1", "s3"]);
        let s3 = snap.sessions.iter().find(|r| &*r.id == "s3").unwrap();
        assert_eq!(s3.queue.len(), 1);
        assert_eq!(s3.queue[0].2.payload.len(), 1000);
        assert!(
            snap.sessions
                .iter()
                .find(|r| &*r.id == "s1")
                .unwrap()
                .queue
                .is_empty()
        );
        assert_eq!(snap.max_payload_id, id);
        s.close();
    }

    #[tokio::test]
    async fn a_message_for_one_session_is_stored_inside_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), false).unwrap();
        let id = s.payload_id();
        s.submit(Op::Session {
            id: Arc::from("one"),
            record: record(),
        });
        s.submit(Op::Enqueue {
            session: Arc::from("one"),
            seq: 7,
            entry: entry(id),
            msg: Some(msg("a/b", b"inline body")),
        });
        let t = s.submit(Op::Routed { payload: id });
        settle(&s, t).await;
        s.close();
        drop(s);
        {
            let raw = Db::open(&dir.path().join("store")).unwrap();
            assert_eq!(
                raw.ks[usize::from(PAYLOADS)].iter().count(),
                0,
                "no payload record"
            );
            assert_eq!(raw.ks[usize::from(QUEUE)].iter().count(), 1);
        }
        let s = open(dir.path(), false).unwrap();
        let snap = s.load().unwrap();
        let q = &snap.sessions[0].queue;
        assert_eq!((q.len(), q[0].0), (1, 7));
        assert_eq!(&q[0].2.payload[..], b"inline body");
        // Acknowledged after the restart: gone, and nothing else to drop.
        let t = s.submit(Op::Dequeue {
            session: Arc::from("one"),
            seq: 7,
            payload: id,
        });
        settle(&s, t).await;
        s.close();
        drop(s);
        let s = open(dir.path(), false).unwrap();
        assert!(s.load().unwrap().sessions[0].queue.is_empty());
        s.close();
    }

    #[tokio::test]
    async fn queued_and_acknowledged_in_one_batch_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let s = Embedded::open(dir.path(), &config(), false, m.clone()).unwrap();
        let before = m.store_bytes_written.load(Ordering::Relaxed);
        let id = s.payload_id();
        // Held back so that all of it lands in one batch.
        let ops = vec![
            Op::Enqueue {
                session: Arc::from("s"),
                seq: 0,
                entry: entry(id),
                msg: Some(msg("t", b"x")),
            },
            Op::Routed { payload: id },
            Op::Dequeue {
                session: Arc::from("s"),
                seq: 0,
                payload: id,
            },
        ];
        let mut idx = Index::default();
        let db = Db::open(&dir.path().join("fold")).unwrap();
        commit(&s.inner, &db, &mut idx, ops).unwrap();
        assert_eq!(m.store_bytes_written.load(Ordering::Relaxed), before);
        assert!(idx.refs.is_empty() && idx.queues.values().all(HashMap::is_empty));
        s.close();
    }

    #[tokio::test]
    async fn subscriptions_are_stored_one_by_one_and_go_with_their_session() {
        use crate::router::SubOptions;
        use crate::store::StoredSub;
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), false).unwrap();
        let sub = |f: &str| StoredSub::new(f, &SubOptions::default());
        for id in ["keep", "end"] {
            s.submit(Op::Session {
                id: Arc::from(id),
                record: record(),
            });
            for f in ["a/#", "b/+", "c"] {
                s.submit(Op::Subscribe {
                    session: Arc::from(id),
                    sub: sub(f),
                });
            }
        }
        let t = s.submit(Op::Unsubscribe {
            session: Arc::from("keep"),
            filter: "b/+".into(),
        });
        settle(&s, t).await;
        // Ended in a later batch than its subscriptions, plus one added in
        // the same batch as the end.
        s.submit(Op::Subscribe {
            session: Arc::from("end"),
            sub: sub("d"),
        });
        let t = s.submit(Op::EndSession {
            id: Arc::from("end"),
        });
        settle(&s, t).await;
        s.close();
        drop(s);
        let s = open(dir.path(), false).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.sessions.len(), 1);
        let mut filters: Vec<_> = snap.sessions[0]
            .subscriptions
            .iter()
            .map(|x| x.filter.clone())
            .collect();
        filters.sort();
        assert_eq!(filters, ["a/#", "c"]);
        s.close();
        drop(s);
        let raw = Db::open(&dir.path().join("store")).unwrap();
        let left = raw.ks[usize::from(SUBS)]
            .prefix(records::session_prefix("end"))
            .count();
        assert_eq!(left, 0, "an ended session leaves no subscription behind");
    }

    #[test]
    fn an_unreadable_record_refuses_to_start_unless_recovering() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(&dir.path().join("store")).unwrap();
            db.ks[usize::from(SESSIONS)]
                .insert("broken", "not a session record")
                .unwrap();
            db.ks[usize::from(RETAINED)]
                .insert("a/b", [0u8; 3])
                .unwrap();
            db.db.persist(PersistMode::SyncAll).unwrap();
        }
        let err = open(dir.path(), false).unwrap_err().to_string();
        assert!(
            err.contains("unreadable") && err.contains("--recover-store"),
            "{err}"
        );
        let s = open(dir.path(), true).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.unreadable, 2);
        assert!(snap.sessions.is_empty() && snap.retained.is_empty());
        s.close();
        drop(s);
        // The unreadable records were dropped: a normal start works now.
        let s = open(dir.path(), false).unwrap();
        s.close();
    }

    #[test]
    fn a_second_broker_on_the_same_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), false).unwrap();
        let err = open(dir.path(), false).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        s.close();
    }
}
