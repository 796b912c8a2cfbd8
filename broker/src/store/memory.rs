//! Memory-only: nothing survives the process. Callers check
//! [`StateStore::persists`] and build no ops, so this costs nothing.

use super::{Durable, Op, Snapshot, StateStore, StoreError, Ticket, TicketSpan};

#[derive(Debug, Default)]
pub struct MemoryStore;

impl StateStore for MemoryStore {
    fn persists(&self) -> bool {
        false
    }

    fn submit(&self, _op: Op) -> Ticket {
        0
    }

    fn durable(&self, _span: TicketSpan) -> Durable<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_durable(&self, _ticket: Ticket) -> bool {
        true
    }

    fn backlog(&self) -> usize {
        0
    }

    fn healthy(&self) -> bool {
        true
    }

    fn payload_id(&self) -> u64 {
        0
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::default())
    }

    fn close(&self) {}
}
