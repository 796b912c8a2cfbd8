//! Bounds-checked cursor over one packet's bytes.
//!
//! Every read checks the bytes still available *in the current packet* (or the
//! current property block) before touching them, so no length taken from the
//! wire can make the decoder read past what was received or allocate more than
//! the packet itself holds.

use bytes::{Buf, Bytes};

use crate::DecodeError;
use crate::packet::ByteString;

pub(crate) const TRUNCATED: DecodeError = DecodeError::Malformed("unexpected end of packet");

/// Largest value a variable byte integer can carry (four 7-bit groups).
pub(crate) const MAX_VARINT: usize = 268_435_455;

/// Parses a variable byte integer from the front of `s`.
///
/// `Ok(None)` means `s` ends before the integer does (more bytes may come);
/// the caller decides whether that is "wait" or "malformed". Over-long and
/// non-minimal encodings are rejected: the spec requires the shortest form
/// (MQTT-1.5.5-1), and one canonical encoding per value means every parser
/// along the path (proxies, bridges) frames the stream the same way.
#[inline]
pub(crate) fn parse_varint(s: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (i, &b) in s.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(DecodeError::Malformed(
                    "variable byte integer not minimally encoded",
                ));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if s.len() >= 4 {
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    } else {
        Ok(None)
    }
}

/// Validates a wire string and wraps it without copying.
///
/// NUL is checked separately because it is valid UTF-8 but forbidden by MQTT
/// (it would truncate the string in C-based peers and ACL tooling).
#[inline]
pub(crate) fn utf8(b: Bytes) -> Result<ByteString, DecodeError> {
    if b.contains(&0) {
        return Err(DecodeError::Malformed("NUL character in UTF-8 string"));
    }
    ByteString::try_from(b).map_err(|_| DecodeError::Malformed("invalid UTF-8 string"))
}

/// The first eight bytes of `c` as one word (`c` is always a full chunk).
#[inline(always)]
fn word(c: &[u8]) -> u64 {
    c.first_chunk::<8>().map_or(0, |a| u64::from_le_bytes(*a))
}

/// Whether `s` contains NUL, `+` or `#`, scanning a word at a time.
///
/// This is the per-PUBLISH topic check; a byte loop was the largest single
/// cost of decoding a small PUBLISH. Clearing bit 3 maps `+` (0x2B) onto `#`
/// (0x23) and nothing else onto it, so two zero-byte tests cover all three.
#[inline]
fn has_nul_or_wildcard(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Exact for "is any byte zero", which is all we ask.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut hits = 0;
    let chunks = s.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        let w = word(c);
        hits |= zero(w) | zero((w & !(ONES << 3)) ^ (ONES * 0x23));
    }
    hits != 0 || tail.iter().any(|&b| b == 0 || b & !0x08 == 0x23)
}

/// A PUBLISH (or will) topic name: a UTF-8 string that additionally must not
/// contain wildcards, checked in a single pass.
#[inline]
pub(crate) fn topic_name(b: Bytes) -> Result<ByteString, DecodeError> {
    if has_nul_or_wildcard(&b) {
        if b.contains(&0) {
            return Err(DecodeError::Malformed("NUL character in UTF-8 string"));
        }
        return Err(DecodeError::InvalidTopic("wildcard in topic name"));
    }
    ByteString::try_from(b).map_err(|_| DecodeError::Malformed("invalid UTF-8 string"))
}

pub(crate) struct Reader {
    buf: Bytes,
    /// Bytes at the end of `buf` that belong to the packet but not to the
    /// region being read (set while reading a property block, which has its
    /// own length). Reads never reach into them.
    tail: usize,
}

impl Reader {
    #[inline]
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf, tail: 0 }
    }

    /// Bytes left in the current region.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.buf.len().saturating_sub(self.tail)
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn avail(&self) -> &[u8] {
        self.buf.get(..self.len()).unwrap_or_default()
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.avail().first().ok_or(TRUNCATED)?;
        self.buf.advance(1);
        Ok(b)
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let v = u16::from_be_bytes(*self.avail().first_chunk::<2>().ok_or(TRUNCATED)?);
        self.buf.advance(2);
        Ok(v)
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let v = u32::from_be_bytes(*self.avail().first_chunk::<4>().ok_or(TRUNCATED)?);
        self.buf.advance(4);
        Ok(v)
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> Result<usize, DecodeError> {
        let (v, n) = parse_varint(self.avail())?.ok_or(TRUNCATED)?;
        self.buf.advance(n);
        Ok(v)
    }

    /// Consumes the next byte if it is 0: an empty property block, the
    /// common case on the PUBLISH hot path.
    #[inline]
    pub(crate) fn skip_zero_byte(&mut self) -> bool {
        if self.avail().first() == Some(&0) {
            self.buf.advance(1);
            true
        } else {
            false
        }
    }

    /// Slices `n` bytes off the front, sharing the packet's allocation.
    #[inline]
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if n > self.len() {
            return Err(TRUNCATED);
        }
        Ok(self.buf.split_to(n))
    }

    /// Length-prefixed binary data.
    #[inline]
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }

    /// Length-prefixed UTF-8 string.
    #[inline]
    pub(crate) fn string(&mut self) -> Result<ByteString, DecodeError> {
        let b = self.binary()?;
        utf8(b)
    }

    /// Restricts reads to the next `n` bytes; returns the token that
    /// [`Reader::unlimit`] needs to restore the outer region.
    #[inline]
    pub(crate) fn limit(&mut self, n: usize) -> Result<usize, DecodeError> {
        let len = self.len();
        if n > len {
            return Err(DecodeError::Malformed(
                "property length exceeds remaining packet",
            ));
        }
        let saved = self.tail;
        self.tail += len - n;
        Ok(saved)
    }

    #[inline]
    pub(crate) fn unlimit(&mut self, saved: usize) {
        self.tail = saved;
    }

    /// Everything left in the packet (the PUBLISH payload, SUBACK codes…),
    /// handed over without a reference-count bump.
    #[inline]
    pub(crate) fn rest(self) -> Bytes {
        let mut b = self.buf;
        let keep = b.len().saturating_sub(self.tail);
        b.truncate(keep);
        b
    }

    /// Fails unless the region has been read completely: trailing garbage
    /// in a fixed-layout packet is a framing error, not something to skip.
    #[inline]
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("unexpected bytes at end of packet"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_scan_agrees_with_a_byte_loop() {
        let naive = |s: &[u8]| s.iter().any(|&b| b == 0 || b == b'+' || b == b'#');
        // Every byte value at every position of strings spanning zero, one
        // and several words plus a tail.
        for len in [1usize, 7, 8, 9, 16, 23] {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[pos] = b;
                    assert_eq!(has_nul_or_wildcard(&s), naive(&s), "{s:?}");
                }
            }
        }
        assert!(!has_nul_or_wildcard(b""));
    }

    #[test]
    fn topic_name_errors() {
        let long = |c: u8| {
            let mut v = b"sensors/building/floor/room".to_vec();
            v[17] = c;
            Bytes::from(v)
        };
        assert!(matches!(
            topic_name(long(b'+')),
            Err(DecodeError::InvalidTopic(_))
        ));
        assert!(matches!(
            topic_name(long(b'#')),
            Err(DecodeError::InvalidTopic(_))
        ));
        assert!(matches!(
            topic_name(long(0)),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            topic_name(long(0xff)),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            &*topic_name(long(b'x')).unwrap(),
            "sensors/building/xloor/room"
        );
    }
}
