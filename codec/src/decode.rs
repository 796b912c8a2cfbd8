//! CONTRACT (to be implemented): bounded decoding.
use bytes::BytesMut;

use crate::{DecodeError, Packet, ProtocolVersion};

/// Decodes one packet from the front of `buf`, consuming its bytes.
///
/// * `Ok(None)`: not enough bytes yet; nothing consumed.
/// * Declared size (fixed header + remaining length) over `max_packet_size`
///   fails at once, before the body has arrived.
/// * `version` is the connection's version (from its CONNECT); CONNECT itself
///   is parsed by its own protocol level.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let _ = (buf, version, max_packet_size);
    Err(DecodeError::Malformed("decoder not written yet"))
}
