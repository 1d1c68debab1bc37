//! Replays the control fuzzer's corpus (`switch/fuzz/corpus/control_request`)
//! on an in-process switch, the way the fuzz target runs it: every line of
//! every file is answered with a well-formed object holding `"ok"`, nothing
//! panics, and the switch is left empty and serving. Runs with stable Rust;
//! the fuzzer itself needs nightly and cargo-fuzz.

use std::path::Path;

use serde_json::json;
use vioswitch::daemon::{Switch, SwitchConfig};

#[path = "../../switch/fuzz/src/sandbox.rs"]
mod sandbox;

#[test]
fn every_corpus_input_gets_well_formed_answers() {
    let corpus =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../switch/fuzz/corpus/control_request");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 12, "only {} corpus files", files.len());
    let dir = vioswitch_testkit::temp_dir("vioswitch-fuzz-replay").unwrap();
    let mut cfg = SwitchConfig::new(dir.clone());
    cfg.workers = Some(2);
    let sw = Switch::start(cfg).expect("start a switch");
    let mut answered = 0;
    let mut ok = 0;
    for f in &files {
        let data = std::fs::read(f).unwrap();
        for answer in sandbox::run(&sw, &data) {
            assert!(
                answer.is_object() && answer["ok"].is_boolean(),
                "{}: {answer}",
                f.display()
            );
            assert!(sandbox::well_formed(&answer), "{}: {answer}", f.display());
            answered += 1;
            ok += usize::from(answer["ok"] == true);
        }
        sandbox::reset(&sw);
        assert_eq!(sw.ports().iter().count(), 0, "{}", f.display());
    }
    assert!(answered > 50 && ok > 20, "{answered} answers, {ok} ok");
    let info = vioswitch::control::handle_line(&sw, br#"{"id":1,"cmd":"switch.info"}"#);
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(
        vioswitch::control::handle_line(&sw, br#"{"cmd":"fdb.show"}"#),
        json!({"id": null, "ok": true, "result": []})
    );
    // Nothing was written outside the run directory's plain files.
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        assert!(!e.file_type().unwrap().is_dir(), "{:?}", e.path());
    }
    sw.shutdown();
}

#[test]
fn paths_are_confined_to_the_run_directory() {
    let dir = Path::new("/run/x");
    let c =
        |line: &str| sandbox::confine(line.as_bytes(), dir).map(|b| String::from_utf8(b).unwrap());
    assert_eq!(
        c(r#"{"cmd":"port.add","args":{"name":"a","socket":"/run/x/a.sock"}}"#),
        None
    );
    for bad in [
        "/etc/passwd",
        "a.sock",
        "/run/x/../y.sock",
        "/run/x/sub/a.sock",
        "/run/x/..",
        "",
        "/run/x/a\u{0}b",
    ] {
        for key in ["socket", "path"] {
            let line = json!({"cmd": "c", "args": {key: bad}}).to_string();
            let out = c(&line).unwrap_or_else(|| panic!("{bad:?} kept"));
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let p = Path::new(v["args"][key].as_str().unwrap());
            assert_eq!(p.parent(), Some(dir), "{bad:?} -> {p:?}");
            assert!(
                p.file_name().unwrap().to_str().unwrap().starts_with('z'),
                "{bad:?} -> {p:?}"
            );
        }
    }
}
