use husk_runtime::monitor::api::Request;
use husk_runtime::state::Status;

use crate::cli::{Format, GlobalOpts, PsArgs};

pub fn ps(g: &GlobalOpts, a: PsArgs) -> anyhow::Result<u8> {
    let t = super::Target::open(g, &a.id)?;
    t.require(&[Status::Created, Status::Running], "list the processes of")?;
    let procs = t.ask(&Request::Ps)?;
    let list = procs.as_array().cloned().unwrap_or_default();
    match a.format {
        // runc's json form: the pids.
        Format::Json => {
            let pids: Vec<i64> = list.iter().filter_map(|p| p["pid"].as_i64()).collect();
            outln!("{}", serde_json::to_string(&pids)?);
        }
        Format::Table => {
            outln!("{:>8} {:>8} {:>6} {:<4} CMD", "PID", "PPID", "UID", "STAT");
            for p in &list {
                let n = |k: &str| p[k].as_i64().unwrap_or(-1);
                outln!(
                    "{:>8} {:>8} {:>6} {:<4} {}",
                    n("pid"),
                    n("ppid"),
                    n("uid"),
                    p["state"].as_str().unwrap_or("?"),
                    p["command"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(0)
}
