//! Replays every input kept under `fuzz/regressions/<target>/` (findings of `scripts/fuzz.sh`)
//! and `fuzz/corpus/<target>/` (the fuzz corpus) through the fuzz harness on stable, so that a
//! fixed finding stays fixed in the default suite, also where nightly is not at hand.
//! The harness is the fuzz crate's own `src/lib.rs`, compiled here as a module.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::path::PathBuf;

fn replay(kind: &str, target: &str, run: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    inputs.sort();
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        // Shown by the test runner only when the input fails.
        eprintln!("replaying {}", path.display());
        run(&data);
    }
    inputs.len()
}

#[test]
fn request_inputs() {
    assert!(replay("regressions", "request", harness::request) > 0);
    assert!(replay("corpus", "request", harness::request) > 0);
}

#[test]
fn sse_inputs() {
    assert!(replay("regressions", "sse", harness::sse) > 0);
    assert!(replay("corpus", "sse", harness::sse) > 0);
}

#[test]
fn event_stream_inputs() {
    assert!(replay("regressions", "event_stream", harness::event_stream) > 0);
    assert!(replay("corpus", "event_stream", harness::event_stream) > 0);
}

#[test]
fn answer_inputs() {
    assert!(replay("regressions", "answer", harness::answer) > 0);
    assert!(replay("corpus", "answer", harness::answer) > 0);
}

#[test]
fn responses_events_inputs() {
    assert!(replay("regressions", "responses_events", harness::responses_events) > 0);
    assert!(replay("corpus", "responses_events", harness::responses_events) > 0);
}
