//! Process listings from `/proc`: one process's details (ListProcesses),
//! and a container's processes when there is no cgroup to ask.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;

use husk_protocol::agent::ProcessInfo;

/// `(state, ppid)` from the text of `/proc/<pid>/stat`; the command name in
/// parentheses may itself contain spaces and parentheses.
pub fn parse_stat(stat: &str) -> Option<(String, i32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_string();
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The effective uid from the text of `/proc/<pid>/status`.
pub fn parse_euid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The command line from `/proc/<pid>/cmdline` (NUL-separated), or the
/// command name in brackets for processes without one (zombies).
pub fn command_line(cmdline: &[u8], comm: &str) -> String {
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        format!("[{}]", comm.trim())
    } else {
        args.join(" ")
    }
}

/// Details of `pid`, or `None` when it is gone.
pub fn process_info(pid: i32) -> Option<ProcessInfo> {
    let dir = format!("/proc/{pid}");
    let (state, ppid) = parse_stat(&fs::read_to_string(format!("{dir}/stat")).ok()?)?;
    let uid =
        parse_euid(&fs::read_to_string(format!("{dir}/status")).unwrap_or_default()).unwrap_or(0);
    let cmdline = fs::read(format!("{dir}/cmdline")).unwrap_or_default();
    let comm = fs::read_to_string(format!("{dir}/comm")).unwrap_or_default();
    Some(ProcessInfo {
        pid,
        ppid,
        uid,
        state,
        command: command_line(&cmdline, &comm),
        ..Default::default()
    })
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A container's processes without a cgroup: those in the PID namespace of
/// `roots[0]` (the init) when it has one, otherwise `roots` and their
/// descendants.
pub fn related_pids(roots: &[i32], pid_namespace: bool) -> Vec<i32> {
    let Some(&init) = roots.first() else {
        return Vec::new();
    };
    if pid_namespace {
        let Ok(ns) = fs::metadata(format!("/proc/{init}/ns/pid")) else {
            return Vec::new();
        };
        return all_pids()
            .into_iter()
            .filter(|pid| {
                fs::metadata(format!("/proc/{pid}/ns/pid"))
                    .is_ok_and(|m| m.ino() == ns.ino() && m.dev() == ns.dev())
            })
            .collect();
    }
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for pid in all_pids() {
        if let Some((_, ppid)) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    descendants(roots, &children)
}

/// `roots` and everything below them in a ppid -> children map.
pub fn descendants(roots: &[i32], children: &HashMap<i32, Vec<i32>>) -> Vec<i32> {
    let mut seen: HashSet<i32> = HashSet::new();
    let mut pending: Vec<i32> = roots.to_vec();
    while let Some(pid) = pending.pop() {
        if seen.insert(pid) {
            pending.extend(children.get(&pid).into_iter().flatten());
        }
    }
    let mut pids: Vec<i32> = seen.into_iter().collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_status() {
        let stat = "42 (my (odd) cmd) S 7 42 42 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(stat), Some(("S".to_string(), 7)));
        assert_eq!(parse_stat("garbage"), None);
        let status = "Name:\tsh\nUid:\t1000\t1001\t1001\t1001\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_euid(status), Some(1001));
        assert_eq!(command_line(b"sleep\x00100\x00", "sleep\n"), "sleep 100");
        assert_eq!(command_line(b"", "sleep\n"), "[sleep]");
    }

    #[test]
    fn descendants_of_roots() {
        let mut children = HashMap::new();
        children.insert(1, vec![10, 11]);
        children.insert(10, vec![100]);
        children.insert(2, vec![20]);
        children.insert(5, vec![50]);
        assert_eq!(descendants(&[1, 2], &children), vec![1, 2, 10, 11, 20, 100]);
    }

    #[test]
    fn this_process_is_listed() {
        let me = std::process::id() as i32;
        let info = process_info(me).unwrap();
        assert_eq!(info.pid, me);
        assert_eq!(info.ppid, nix::unistd::getppid().as_raw());
        assert!(!info.command.is_empty());
    }
}
