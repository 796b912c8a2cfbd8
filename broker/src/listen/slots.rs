//! Connection slots: every accepted socket on a client listener holds one
//! from accept until it closes — through the TLS handshake, the HTTP
//! request before a WebSocket upgrade and the MQTT session — so
//! `max_connections` and `max_connections_per_address` bound sockets, not
//! just the sessions that got as far as CONNECT.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::metrics::Limit;
use crate::server::Shared;

#[derive(Debug, Default)]
pub struct SocketCounter {
    total: AtomicUsize,
    /// Only kept when a per-address cap is configured.
    per_addr: Mutex<HashMap<IpAddr, usize>>,
}

impl SocketCounter {
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn addr_map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_addr.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerAddress,
}

/// The decision, as a pure function of the counts.
pub fn admits(
    total: usize,
    from_addr: usize,
    max_total: usize,
    max_per_addr: usize,
) -> Result<(), Refused> {
    if total >= max_total {
        Err(Refused::Total)
    } else if max_per_addr > 0 && from_addr >= max_per_addr {
        Err(Refused::PerAddress)
    } else {
        Ok(())
    }
}

/// One admitted socket; released when dropped.
#[derive(Debug)]
pub struct Slot {
    shared: Arc<Shared>,
    addr: Option<IpAddr>,
}

/// Takes a slot for a socket from `ip`, or says which limit refused it
/// (counted in `starling_limit_refusals_total`).
pub fn take(shared: &Arc<Shared>, ip: IpAddr) -> Result<Slot, Refused> {
    let limits = shared.limits();
    let c = &shared.sockets;
    let per_addr = limits.max_connections_per_address;
    // The total is checked and bumped without a lock: racing accepts can
    // overshoot by the number of listeners, which is harmless.
    let decision = if per_addr == 0 {
        admits(c.total(), 0, limits.max_connections, 0)
    } else {
        let mut map = c.addr_map();
        let n = map.get(&ip).copied().unwrap_or(0);
        let d = admits(c.total(), n, limits.max_connections, per_addr);
        if d.is_ok() {
            map.insert(ip, n + 1);
        }
        d
    };
    match decision {
        Ok(()) => {
            c.total.fetch_add(1, Ordering::Relaxed);
            Ok(Slot {
                shared: shared.clone(),
                addr: (per_addr > 0).then_some(ip),
            })
        }
        Err(r) => {
            shared.metrics.limit_hit(match r {
                Refused::Total => Limit::Connections,
                Refused::PerAddress => Limit::ConnectionsPerAddress,
            });
            Err(r)
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let c = &self.shared.sockets;
        c.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.addr {
            let mut map = c.addr_map();
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// An HTTP connection's slot, handed to the WebSocket upgrade that takes
/// the socket over (the HTTP connection's task ends at the upgrade).
#[derive(Debug, Clone, Default)]
pub struct SlotCell(Arc<Mutex<Option<Slot>>>);

impl SlotCell {
    pub fn new(slot: Option<Slot>) -> Self {
        SlotCell(Arc::new(Mutex::new(slot)))
    }

    pub fn take(&self) -> Option<Slot> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        assert_eq!(admits(0, 0, 10, 0), Ok(()));
        assert_eq!(admits(10, 0, 10, 0), Err(Refused::Total));
        assert_eq!(admits(5, 3, 10, 3), Err(Refused::PerAddress));
        assert_eq!(admits(5, 2, 10, 3), Ok(()));
        assert_eq!(admits(5, 1000, 10, 0), Ok(()), "0 = no per-address cap");
    }
}
