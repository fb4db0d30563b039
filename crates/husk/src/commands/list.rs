use husk_runtime::state::ContainerState;

use crate::cli::{Format, GlobalOpts, ListArgs};

pub fn list(g: &GlobalOpts, a: ListArgs) -> anyhow::Result<u8> {
    let mut states: Vec<ContainerState> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&g.root) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(s) = ContainerState::load(&e.path(), &id) {
                states.push(s);
            }
        }
    }
    states.sort_by(|a, b| a.id.cmp(&b.id));
    if a.quiet {
        for s in &states {
            outln!("{}", s.id);
        }
        return Ok(0);
    }
    match a.format {
        Format::Json => {
            let v: Vec<_> = states.iter().map(ContainerState::oci_state).collect();
            outln!("{}", serde_json::to_string(&v)?);
        }
        Format::Table => {
            outln!(
                "{:<24} {:<8} {:<8} {:<40} {:<30} OWNER",
                "ID",
                "PID",
                "STATUS",
                "BUNDLE",
                "CREATED"
            );
            for s in &states {
                let v = s.oci_state();
                outln!(
                    "{:<24} {:<8} {:<8} {:<40} {:<30} {}",
                    s.id,
                    v["pid"].as_i64().unwrap_or(0),
                    v["status"].as_str().unwrap_or("?"),
                    s.bundle.display(),
                    s.created,
                    if s.owner.is_empty() { "root" } else { &s.owner }
                );
            }
        }
    }
    Ok(0)
}
