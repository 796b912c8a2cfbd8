//! Replays the committed cargo-fuzz corpus and every saved crash through the
//! same checks the fuzz targets run (`starling_codec::fuzzing`), so CI keeps
//! what the fuzzer found without needing libFuzzer or a nightly toolchain.
//! Inputs: `fuzz/corpus/<target>/` (must exist and not be empty) and
//! `fuzz/regressions/<target>/` (optional). See fuzz/README.md.

#[path = "../../fuzz/replay.rs"]
mod replay;

use replay::replay;
use starling_codec::fuzzing;

#[test]
fn decode_v311() {
    replay("decode_v311", fuzzing::decode_stream_v311);
}

#[test]
fn decode_v5() {
    replay("decode_v5", fuzzing::decode_stream_v5);
}

#[test]
fn roundtrip() {
    replay("roundtrip", fuzzing::roundtrip);
}
