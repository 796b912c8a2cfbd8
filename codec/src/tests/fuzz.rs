//! Randomized robustness: mutated valid packets and random bytes must never
//! panic the decoder, never make it consume more than it was given, and
//! whatever it accepts must re-encode to something that decodes the same.

use bytes::BytesMut;

use super::*;
use crate::{decode, encode};

/// xorshift64*: tiny, deterministic, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V31,
    ProtocolVersion::V311,
    ProtocolVersion::V5,
];

fn corpus() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (v5, v) in [(true, V5), (false, V3)] {
        for p in sample_packets(v5) {
            seeds.push(encode_one(&p, v).to_vec());
        }
    }
    seeds
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.byte();
            }
            2 => {
                let i = rng.below(len + 1);
                data.insert(i, rng.byte());
            }
            3 if len > 0 => {
                data.remove(rng.below(len));
            }
            4 => data.truncate(rng.below(len + 1)),
            // Interesting values at a random spot: lengths and markers.
            5 if len > 0 => {
                let i = rng.below(len);
                data[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, b'+', b'#', 0x26, 0x0b][rng.below(9)];
            }
            _ if len > 1 => {
                // Splice a copy of one region elsewhere (packet concatenation,
                // repeated properties).
                let a = rng.below(len);
                let b = a + rng.below(len - a);
                let chunk = data[a..b].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            _ => {}
        }
    }
}

fn check(data: &[u8], v: ProtocolVersion, max: usize) {
    let mut buf = BytesMut::from(data);
    for _ in 0..8 {
        let before = buf.len();
        match decode(&mut buf, v, max) {
            Ok(Some(p)) => {
                assert!(buf.len() < before);
                // Accepted input must survive our own encoder unchanged.
                let mut out = BytesMut::new();
                let enc_v = match &p {
                    Packet::Connect(c) => c.protocol,
                    _ => v,
                };
                encode(&p, enc_v, &mut out).expect("decoded packet re-encodes");
                let again = decode(&mut out, v, usize::MAX)
                    .expect("re-encoded packet decodes")
                    .expect("complete");
                assert_eq!(again, p, "input {data:02x?}");
                assert!(out.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before);
                return;
            }
            Err(_) => {
                assert!(buf.len() <= before);
                return;
            }
        }
    }
}

#[test]
fn random_and_mutated_input_never_panics() {
    let seeds = corpus();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut data = Vec::with_capacity(512);
    for case in 0..200_000 {
        data.clear();
        if case % 4 == 0 {
            // Random bytes, biased towards a valid first byte so the body
            // parsers are reached, not just the header check.
            let n = rng.below(48);
            data.extend((0..n).map(|_| rng.byte()));
            if let Some(first) = data.first_mut() {
                *first = (*first & 0xf0) | [0, 2, 0][rng.below(3)];
                if rng.below(2) == 0 && n > 1 {
                    data[1] = (n - 2) as u8 & 0x7f;
                }
            }
        } else {
            data.extend_from_slice(&seeds[rng.below(seeds.len())]);
            mutate(&mut rng, &mut data);
        }
        let v = VERSIONS[rng.below(3)];
        let max = [usize::MAX, usize::MAX, 1 << 16, 64][rng.below(4)];
        check(&data, v, max);
    }
}
