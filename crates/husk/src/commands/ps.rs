use husk_runtime::monitor::api::{Request, Response};
use husk_runtime::status::Verb;

use crate::cli::{Format, GlobalOpts, PsArgs};

pub fn ps(g: &GlobalOpts, a: PsArgs) -> anyhow::Result<u8> {
    let t = super::Target::open(g, &a.id)?;
    t.require(Verb::Inspect)?;
    let Response::Processes { processes: list } = t.ask(&Request::Ps)? else {
        anyhow::bail!("the monitor of {} answered Ps with something else", a.id);
    };
    match a.format {
        // runc's json form: the pids.
        Format::Json => {
            let pids: Vec<i32> = list.iter().map(|p| p.pid).collect();
            outln!("{}", serde_json::to_string(&pids)?);
        }
        Format::Table => {
            outln!("{:>8} {:>8} {:>6} {:<4} CMD", "PID", "PPID", "UID", "STAT");
            for p in &list {
                outln!(
                    "{:>8} {:>8} {:>6} {:<4} {}",
                    p.pid,
                    p.ppid,
                    p.uid,
                    p.state,
                    p.command
                );
            }
        }
    }
    Ok(0)
}
