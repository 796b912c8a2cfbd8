//! The compact form of a parked connection.
//!
//! A running connection carries what only its task uses: write and read
//! buffers, scratch vectors for routing and draining, backpressure waits,
//! store tickets, and the socket's registration in tokio's reactor (256
//! bytes of its own). A parked connection has none of them in use: it
//! waits for input, a wake or its keep-alive, and the parker watches its
//! socket in an epoll set of its own. So parking folds [`Live`] into a
//! [`Dormant`] of what must survive (the session, the agreed terms, the
//! topic aliases, the guards) and resuming unfolds it again; an idle
//! connection then costs its session and this, not a running task's state.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use starling_codec::{ByteString, LastWill, ProtocolVersion};
use starling_model::acl::Principal;
use tokio::time::Instant;

use super::connection::{Connection, Live, Work};
use super::handshake::Terms;
use super::lazy_map::LazyMap;
use super::state::{ConnLink, Session};
use crate::listen::slots::Slot;
use crate::listen::transport::{Severed, TcpTransport};
use crate::metrics;
use crate::server::Shared;

/// What a parked plain-TCP connection keeps.
pub(super) struct Dormant {
    shared: Arc<Shared>,
    session: Arc<Session>,
    link: Arc<ConnLink>,
    version: ProtocolVersion,
    agreed: Terms,
    will: Option<Box<LastWill>>,
    principal: Arc<Principal>,
    acl_cache: LazyMap<ByteString, bool>,
    peer: SocketAddr,
    last_rx: Instant,
    aliases_in: LazyMap<u16, ByteString>,
    aliases_out: LazyMap<ByteString, u16>,
    limits: Arc<starling_model::config::Limits>,
    /// Registered with the parker's epoll set, not with tokio's reactor.
    socket: std::net::TcpStream,
    /// The start of a packet the client has not finished sending (rare:
    /// boxed, so the usual empty buffer costs a pointer).
    partial: Option<Box<BytesMut>>,
    span: Option<Box<tracing::Span>>,
    open: metrics::OpenConnection,
    slot: Option<Slot>,
    /// When it was parked, in the parker's ticks (four bytes, not an
    /// `Instant`'s sixteen).
    pub(super) since: u32,
}

impl Dormant {
    /// Folds a connection its task found idle (see `Connection::parkable`:
    /// nothing to write, no tickets, no backpressure wait). Fails only if
    /// the reactor would not let go of the socket, which is then gone: the
    /// connection comes back without one, to end as lost.
    pub(super) fn fold(
        live: Box<Live<TcpTransport>>,
        since: u32,
    ) -> Result<Box<Dormant>, Box<Live<Severed>>> {
        let Live {
            conn,
            t,
            rbuf,
            span,
            _open: open,
            _slot: slot,
        } = *live;
        let socket = match t.into_std() {
            Ok(s) => s,
            Err(e) => {
                lost_socket(&conn.peer, &conn.session.client_id, &e);
                return Err(Box::new(Live {
                    conn,
                    t: Severed,
                    rbuf,
                    span,
                    _open: open,
                    _slot: slot,
                }));
            }
        };
        let work = &conn.work;
        debug_assert!(
            work.wbuf.is_empty()
                && work.gate.is_empty()
                && work.blocked.is_none()
                && !work.yield_soon
        );
        // What is not moved here (the running state, `park_when_idle`) is
        // dropped; `unfold` names every field of `Connection`, so a new one
        // is decided on there.
        Ok(Box::new(Dormant {
            shared: conn.shared,
            session: conn.session,
            link: conn.link,
            version: conn.version,
            agreed: conn.agreed,
            will: conn.will,
            principal: conn.principal,
            acl_cache: conn.acl_cache,
            peer: conn.peer,
            last_rx: conn.last_rx,
            aliases_in: conn.aliases_in,
            aliases_out: conn.aliases_out,
            limits: conn.limits,
            socket,
            partial: (!rbuf.is_empty()).then(|| Box::new(rbuf)),
            span,
            open,
            slot,
            since,
        }))
    }

    /// The socket, for the parker's epoll set.
    pub(super) fn socket(&self) -> &std::net::TcpStream {
        &self.socket
    }

    pub(super) fn link(&self) -> &Arc<ConnLink> {
        &self.link
    }

    /// When the client's keep-alive lapses without a packet from it.
    pub(super) fn keepalive_deadline(&self) -> Option<Instant> {
        let ka = super::connection::keepalive(self.agreed.keep_alive);
        (!ka.is_zero()).then(|| self.last_rx + ka)
    }

    /// Unfolds the connection for a new task. After a
    /// `long` park it parks again as soon as it is idle: a client that
    /// speaks every few seconds would otherwise keep a task and a timer
    /// for most of its life.
    pub(super) fn unfold(self: Box<Self>, long: bool) -> Box<Live<TcpTransport>> {
        let d = *self;
        let conn = Connection {
            shared: d.shared,
            session: d.session,
            link: d.link,
            version: d.version,
            agreed: d.agreed,
            will: d.will,
            principal: d.principal,
            acl_cache: d.acl_cache,
            peer: d.peer,
            last_rx: d.last_rx,
            aliases_in: d.aliases_in,
            aliases_out: d.aliases_out,
            limits: d.limits,
            park_when_idle: long,
            work: Work::default(),
        };
        Box::new(Live {
            conn,
            // Registered with the reactor only if it has to wait (see
            // `TcpTransport::loose`).
            t: TcpTransport::loose(d.socket),
            rbuf: d.partial.map(|b| *b).unwrap_or_default(),
            span: d.span,
            _open: d.open,
            _slot: d.slot,
        })
    }
}

fn lost_socket(peer: &SocketAddr, client_id: &str, e: &io::Error) {
    tracing::warn!(%peer, client_id, error = %e, "an idle connection's socket could not be taken out of the reactor to park it; the connection is closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point of folding: a parked connection holds far less than a
    /// running one (whose socket has a 256-byte reactor registration too).
    #[test]
    fn a_dormant_connection_is_small() {
        let dormant = std::mem::size_of::<Dormant>();
        let live = std::mem::size_of::<Live<TcpTransport>>();
        assert!(dormant <= 232, "Dormant is {dormant} bytes");
        assert!(
            dormant + 150 <= live + 256,
            "Dormant {dormant} vs Live {live}"
        );
    }
}
