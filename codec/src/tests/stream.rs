use bytes::BytesMut;

use super::*;
use crate::decode;

/// Feeds the concatenated encodings one byte at a time, as a slow socket
/// would, and checks the same packets come out and nothing is consumed
/// while a packet is incomplete.
fn byte_at_a_time(v: ProtocolVersion, packets: &[Packet]) {
    let mut stream = BytesMut::new();
    for p in packets {
        crate::encode(p, v, &mut stream).unwrap();
    }
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &b in stream.iter() {
        buf.extend_from_slice(&[b]);
        loop {
            let before = buf.len();
            match decode(&mut buf, v, usize::MAX).unwrap() {
                Some(p) => got.push(p),
                None => {
                    assert_eq!(buf.len(), before, "consumed while incomplete");
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty());
    assert_eq!(got, packets);
}

#[test]
fn incremental_decoding_v5() {
    byte_at_a_time(V5, &sample_packets(true));
}

#[test]
fn incremental_decoding_v311() {
    byte_at_a_time(V3, &sample_packets(false));
}

#[test]
fn many_packets_in_one_buffer() {
    let packets = sample_packets(true);
    let mut buf = BytesMut::new();
    for p in &packets {
        crate::encode(p, V5, &mut buf).unwrap();
    }
    let mut got = Vec::new();
    while let Some(p) = decode(&mut buf, V5, usize::MAX).unwrap() {
        got.push(p);
    }
    assert_eq!(got, packets);
}
