//! MQTT 3.1.1 and 5.0 wire format.
//!
//! This crate is the broker's security boundary: every length read from the
//! wire is checked against the bytes actually present and against the
//! configured maximum packet size *before* anything is allocated. Payloads and
//! topics are sliced out of the read buffer (`Bytes`), never copied, so one
//! received PUBLISH can be fanned out to many subscribers without touching the
//! payload again.

mod decode;
mod encode;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod packet;
mod properties;
mod reader;
#[cfg(test)]
mod tests;

pub use decode::decode;

/// Most topic filters in one SUBSCRIBE or UNSUBSCRIBE, and most
/// subscription identifiers in one packet. With [`MAX_USER_PROPERTIES`] this
/// keeps a decoded packet within a small multiple of its wire size.
pub const MAX_ITEMS_PER_PACKET: usize = 1024;
/// Most user properties in one packet.
pub const MAX_USER_PROPERTIES: usize = 128;
pub use encode::{encode, encode_publish, publish_encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
