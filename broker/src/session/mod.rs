//! Sessions: the per-client state machine (`connection`), the state that
//! survives reconnects (`state`) and the client-id registry (`registry`).

pub mod connection;
pub mod handshake;
pub mod registry;
pub mod state;

pub use registry::Registry;
pub use state::{ConnLink, Session};
