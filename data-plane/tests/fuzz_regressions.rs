//! Replays every input kept under `fuzz/regressions/<target>/` (findings of `scripts/fuzz.sh`)
//! through the fuzz harness on stable, so that a fixed finding stays fixed in the default suite.
//! The harness is the fuzz crate's own `src/lib.rs`, compiled here as a module.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    inputs.sort();
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        eprintln!("replaying {}", path.display());
        run(&data);
    }
    inputs.len()
}

#[test]
fn request_regressions() {
    assert!(
        replay("request", harness::request) > 0,
        "no inputs kept for request"
    );
}

#[test]
fn sse_regressions() {
    assert!(replay("sse", harness::sse) > 0, "no inputs kept for sse");
}

#[test]
fn event_stream_regressions() {
    assert!(
        replay("event_stream", harness::event_stream) > 0,
        "no inputs kept for event_stream"
    );
}

#[test]
fn answer_regressions() {
    assert!(
        replay("answer", harness::answer) > 0,
        "no inputs kept for answer"
    );
}
