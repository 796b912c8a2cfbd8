//! CONTRACT (to be implemented): encoding.
use bytes::BytesMut;

use crate::{EncodeError, Packet, ProtocolVersion, PublishRef};

/// Appends `packet` to `out` in the wire format of `version`.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let _ = (packet, version, out);
    Err(EncodeError::NotInVersion)
}

/// Appends one PUBLISH (hot path: no allocation besides `out` growing).
pub fn encode_publish(p: &PublishRef<'_>, version: ProtocolVersion, out: &mut BytesMut) {
    let _ = (p, version, out);
}

/// Exact encoded size of `p`, to compare with the client's Maximum Packet Size.
pub fn publish_encoded_len(p: &PublishRef<'_>, version: ProtocolVersion) -> usize {
    let _ = (p, version);
    0
}
