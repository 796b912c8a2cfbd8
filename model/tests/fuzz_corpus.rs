//! Replays the committed cargo-fuzz corpus and every saved crash through the
//! same checks the fuzz targets run (`starling_model::fuzzing`), so CI keeps
//! what the fuzzer found without needing libFuzzer or a nightly toolchain.
//! Inputs: `fuzz/corpus/<target>/` (must exist and not be empty) and
//! `fuzz/regressions/<target>/` (optional). See fuzz/README.md.

#[path = "../../fuzz/replay.rs"]
mod replay;

use replay::replay;
use starling_model::fuzzing;

#[test]
fn topic() {
    replay("topic", fuzzing::topic);
}

#[test]
fn bundle() {
    replay("bundle", fuzzing::bundle);
}

#[test]
fn config() {
    replay("config", fuzzing::config);
}
