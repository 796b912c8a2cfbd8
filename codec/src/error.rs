use thiserror::Error;

use crate::packet::reason;

/// Why bytes from the wire could not become a packet. Every variant maps to
/// the v5 reason code a broker sends before closing (see [`DecodeError::reason_code`]).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("unsupported protocol name or level")]
    UnsupportedProtocol,
    #[error("invalid topic name: {0}")]
    InvalidTopic(&'static str),
    /// More items in one packet than the decoder accepts: bounds the memory
    /// one packet can cost (a packet of empty items would otherwise decode
    /// into many times its wire size).
    #[error("too many {0} in one packet")]
    TooMany(&'static str),
}

impl DecodeError {
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocol => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::InvalidTopic(_) => reason::TOPIC_NAME_INVALID,
            DecodeError::TooMany(_) => reason::QUOTA_EXCEEDED,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    #[error("packet too large to encode ({0} bytes)")]
    TooLarge(usize),
    #[error("packet kind not valid in this protocol version")]
    NotInVersion,
}
