//! Which tickets are durable: the writer settles them batch by batch, in
//! order, and connections wait on a watch channel instead of one wake-up
//! object per pending acknowledgement.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use super::StoreError;

/// Failed batches remembered, so a waiter arriving late still learns that
/// its ticket failed. Waiters wait at once, so a short memory is enough.
const FAILED_KEPT: usize = 4096;

#[derive(Debug)]
pub struct Tickets {
    settled: watch::Sender<u64>,
    /// Inclusive ranges of tickets whose batch did not commit.
    failed: Mutex<VecDeque<(u64, u64)>>,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets {
            settled: watch::channel(0).0,
            failed: Mutex::new(VecDeque::new()),
        }
    }
}

impl Tickets {
    pub fn settled(&self) -> u64 {
        *self.settled.borrow()
    }

    /// Every ticket up to `last` is durable.
    pub fn commit(&self, last: u64) {
        self.settled.send_if_modified(|s| {
            let moved = last > *s;
            *s = (*s).max(last);
            moved
        });
    }

    /// Tickets `first..=last` were not written.
    pub fn fail(&self, first: u64, last: u64) {
        {
            let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            if f.len() >= FAILED_KEPT {
                f.pop_front();
            }
            f.push_back((first, last));
        }
        self.commit(last);
    }

    fn outcome(&self, first: u64, last: u64) -> Result<(), StoreError> {
        let f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.iter().any(|&(a, b)| a <= last && first <= b) {
            Err(StoreError::Write(
                "a batch holding this message was not written".into(),
            ))
        } else {
            Ok(())
        }
    }

    pub fn is_done(&self, t: u64) -> bool {
        t == 0 || self.settled() >= t
    }

    /// Waits until `last` is settled; an error if any ticket of
    /// `first..=last` failed.
    pub async fn wait(&self, first: u64, last: u64) -> Result<(), StoreError> {
        if last == 0 {
            return Ok(());
        }
        let mut rx = self.settled.subscribe();
        if rx.wait_for(|&s| s >= last).await.is_err() {
            return Err(StoreError::Closed);
        }
        self.outcome(first.max(1), last)
    }

    /// Wakes every waiter with an error: the writer is gone.
    pub fn close(&self, last: u64) {
        let first = self.settled() + 1;
        if last >= first {
            self.fail(first, last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_learn_whether_their_batch_committed() {
        let t = Tickets::default();
        assert!(t.is_done(0));
        assert!(!t.is_done(1));
        t.commit(3);
        assert!(t.wait(1, 2).await.is_ok());
        t.fail(4, 6);
        assert!(t.wait(5, 5).await.is_err());
        t.commit(7);
        assert!(t.wait(7, 7).await.is_ok());
        assert!(
            t.wait(3, 7).await.is_err(),
            "a failure inside the span fails it"
        );
        assert!(
            t.wait(4, 4).await.is_err(),
            "late waiters still see the failure"
        );
        let waiting = t.wait(8, 8);
        t.commit(8);
        assert!(waiting.await.is_ok());
    }
}
