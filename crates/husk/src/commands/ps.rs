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
        // runc's json form is a list of host pids, which its callers (the
        // runc shim for `ctr task ps`, `docker top`) look up on the host.
        // The container's processes live in the VM: their pids are the
        // guest's and would name unrelated host processes.
        Format::Json => {
            anyhow::bail!(
                "{}'s {} processes run in its VM: their pids are the guest's and name nothing on the host, so there is no host pid list to give; list them with `husk ps {}` (the guest's view) or `docker exec {} ps`",
                a.id,
                list.len(),
                a.id,
                a.id
            );
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
