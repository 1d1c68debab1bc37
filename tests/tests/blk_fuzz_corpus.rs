//! Replays the virtio-blk request fuzzer's corpus
//! (`switch/fuzz/corpus/blk_request`) through the same harness the fuzz
//! target uses (`switch/fuzz/src/blk_input.rs`): no input panics or breaks
//! the parser's invariants, and the corpus reaches every outcome (parsed,
//! no status, short header, wrong direction). Runs with stable Rust; the
//! fuzzer itself needs nightly and cargo-fuzz.

use std::path::Path;

use vioswitch::blk::ParseError;

#[path = "../../switch/fuzz/src/blk_input.rs"]
mod blk_input;

use blk_input::Outcome;

#[test]
fn every_corpus_input_parses_within_the_chain() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../switch/fuzz/corpus/blk_request");
    let files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 10, "only {} corpus files", files.len());
    let (mut ok, mut no_status, mut short, mut wrong) = (0, 0, 0, 0);
    for f in &files {
        match blk_input::run(&std::fs::read(f).unwrap()) {
            Outcome::Empty => {}
            Outcome::Parsed(Ok(())) => ok += 1,
            Outcome::Parsed(Err(ParseError::NoStatus)) => no_status += 1,
            Outcome::Parsed(Err(ParseError::ShortHeader)) => short += 1,
            Outcome::Parsed(Err(ParseError::WrongDirection)) => wrong += 1,
        }
    }
    assert!(
        ok > 0 && no_status > 0 && short > 0 && wrong > 0,
        "ok {ok}, no status {no_status}, short header {short}, wrong direction {wrong}"
    );
}
