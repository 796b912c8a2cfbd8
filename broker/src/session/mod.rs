//! Sessions: the per-client state machine (`connection`), the state that
//! survives reconnects (`state`) and the client-id registry (`registry`).

mod authz;
pub mod connection;
mod dormant;
pub mod handshake;
mod inbound;
mod lazy_map;
mod outbound;
pub mod park;
pub mod registry;
pub mod state;

pub use registry::Registry;
pub use state::{ConnLink, Session};
