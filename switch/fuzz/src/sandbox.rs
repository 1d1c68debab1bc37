//! Running control requests from a fuzzer (or its corpus) on an in-process
//! switch, without letting them touch anything outside the switch's run
//! directory. Shared by the `control_request` fuzz target and the corpus
//! replay test of the main workspace (`tests/tests/control_fuzz_corpus.rs`,
//! which includes this file by path).
//!
//! The control protocol lets a client name files: port sockets (`socket`)
//! and `config.save` paths (`path`). Run as root, a fuzzer would soon write
//! over `/etc`. So before a request line reaches the switch, every `socket`
//! or `path` argument that does not already name a plain file in the run
//! directory is rewritten to one there (keeping a sanitised part of its
//! name, so that the fuzzer still makes sockets collide and paths repeat).
//! Lines that are not JSON objects pass unchanged: the switch cannot act on
//! them.

#![allow(dead_code)]

use std::path::{Component, Path};

use serde_json::Value;
use vioswitch::daemon::Switch;

/// Most request lines run per input.
pub const MAX_LINES: usize = 16;

/// The request lines of an input, as a control connection splits them
/// (blank lines skipped), at most [`MAX_LINES`].
pub fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .take(MAX_LINES)
}

/// Whether `p` is `dir/NAME` with a plain NAME.
fn inside(p: &str, dir: &Path) -> bool {
    let p = Path::new(p);
    p.parent() == Some(dir)
        && matches!(p.components().next_back(), Some(Component::Normal(_)))
        && !p.as_os_str().as_encoded_bytes().contains(&0)
}

/// A path in `dir` standing for `p`.
fn confined(p: &str, dir: &Path) -> String {
    let tail: String = p
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(24)
        .collect();
    let name = format!("z{}", tail.trim_start_matches('.'));
    dir.join(name).to_string_lossy().into_owned()
}

/// `line` with its `socket` and `path` arguments moved into `dir`, or `None`
/// when it needs no change.
pub fn confine(line: &[u8], dir: &Path) -> Option<Vec<u8>> {
    let mut req: Value = serde_json::from_slice(line).ok()?;
    let args = req.get_mut("args")?.as_object_mut()?;
    let mut changed = false;
    for key in ["socket", "path"] {
        if let Some(Value::String(p)) = args.get_mut(key) {
            if !inside(p, dir) {
                *p = confined(p, dir);
                changed = true;
            }
        }
    }
    changed.then(|| req.to_string().into_bytes())
}

/// Run one input: each line, confined, through the control handler. Returns
/// the answers.
pub fn run(sw: &Switch, data: &[u8]) -> Vec<Value> {
    let dir = sw.run_dir().to_path_buf();
    lines(data)
        .map(|line| {
            let confined = confine(line, &dir);
            vioswitch::control::handle_line(sw, confined.as_deref().unwrap_or(line))
        })
        .collect()
}

/// Remove every port (and with them their static FDB entries), so that the
/// next input starts from an empty switch.
pub fn reset(sw: &Switch) {
    let names: Vec<String> = sw.ports().iter().map(|p| p.spec.name.clone()).collect();
    for name in names {
        let req = serde_json::json!({"cmd": "port.del", "args": {"name": name}});
        vioswitch::control::handle_line(sw, req.to_string().as_bytes());
    }
}

/// Whether an answer is what the protocol promises: an object with a boolean
/// `ok`, and a `result` or an `error` with a `code` string.
pub fn well_formed(answer: &Value) -> bool {
    match answer.get("ok").and_then(Value::as_bool) {
        Some(true) => answer.get("result").is_some(),
        Some(false) => {
            answer["error"]["code"].is_string() && answer["error"]["message"].is_string()
        }
        None => false,
    }
}
