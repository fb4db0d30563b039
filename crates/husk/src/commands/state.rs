use husk_runtime::state::{ContainerState, Status};
use serde_json::{json, Value};

use crate::cli::GlobalOpts;

/// runc's state JSON for `s`.
pub fn state_json(s: &ContainerState) -> Value {
    let status = s.effective_status();
    let mut v = json!({
        "ociVersion": "1.1.0",
        "id": s.id,
        "pid": if status == Status::Stopped { 0 } else { s.pid },
        "status": status.to_string(),
        "bundle": s.bundle,
        "rootfs": s.rootfs,
        "created": s.created,
        "owner": s.owner,
    });
    if !s.annotations.is_empty() {
        v["annotations"] = json!(s.annotations);
    }
    v
}

pub fn state(g: &GlobalOpts, id: &str) -> anyhow::Result<u8> {
    let t = super::Target::open(g, id)?;
    outln!("{}", serde_json::to_string_pretty(&state_json(&t.state))?);
    Ok(0)
}
