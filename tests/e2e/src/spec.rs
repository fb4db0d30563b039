//! Helpers for the tests of the OCI spec inside the VM
//! (`tests/spec_vm_root.rs`): editing a bundle's spec by area, hooks that
//! record what they were given, and normalizing what the container printed.

use std::path::Path;

use serde_json::{json, Value};

use crate::repo_root;

/// The seccomp profile podman generates by default (the agent's test data).
pub fn podman_seccomp_profile() -> Value {
    let path = repo_root().join("crates/husk-agent/src/seccomp/testdata/podman-default.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("podman-default.json is JSON")
}

/// An OCI hook that appends one line to `out`: `name`, a space, and the
/// state JSON it got on stdin.
pub fn recording_hook(name: &str, out: &Path) -> Value {
    let out = out.display();
    json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("{{ printf '%s ' {name}; cat; echo; }} >> {out}")]
    })
}

/// One recorded hook call: its name and the state it saw.
#[derive(Debug)]
pub struct HookCall {
    pub name: String,
    pub state: Value,
}

/// Reads what [`recording_hook`]s wrote to `out`, in order.
pub fn hook_calls(out: &Path) -> Vec<HookCall> {
    let text = std::fs::read_to_string(out)
        .unwrap_or_else(|e| panic!("no hook wrote {}: {e}", out.display()));
    text.lines()
        .map(|l| {
            let (name, state) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad hook line: {l:?}"));
            HookCall {
                name: name.to_string(),
                state: serde_json::from_str(state)
                    .unwrap_or_else(|e| panic!("hook {name} got no JSON state ({e}): {state:?}")),
            }
        })
        .collect()
}

/// `text`'s lines with every run of blanks (spaces, tabs) made one space.
pub fn normalized_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}
