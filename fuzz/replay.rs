//! The corpus replay shared by `codec/tests/fuzz_corpus.rs` and
//! `model/tests/fuzz_corpus.rs` (included with `#[path]`): every file in
//! `fuzz/corpus/<target>/` (which must exist and not be empty) and
//! `fuzz/regressions/<target>/` goes through the target's check, and each
//! failing input is named.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("readable directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

pub fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus_dir = root.join("corpus").join(target);
    assert!(
        corpus_dir.is_dir(),
        "corpus directory {} is missing",
        corpus_dir.display()
    );
    let corpus = files(&corpus_dir);
    assert!(
        !corpus.is_empty(),
        "corpus directory {} is empty",
        corpus_dir.display()
    );
    let regressions = files(&root.join("regressions").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    println!(
        "{target}: replayed {} inputs ({} corpus, {} regressions)",
        corpus.len() + regressions.len(),
        corpus.len(),
        regressions.len()
    );
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:#?}");
}
