use std::os::fd::AsFd;

use anyhow::Context;
use husk_runtime::bundle::Bundle;
use husk_runtime::console;
use husk_runtime::monitor::api::{ExecStdio, Request};
use husk_runtime::monitor::client::MonitorClient;
use husk_runtime::state::ContainerState;
use husk_runtime::status::Verb;
use serde_json::{json, Value};
use signal_hook::consts::signal::*;

use crate::cli::{ExecArgs, GlobalOpts};

/// The OCI process to run: `--process FILE`, or the container's own process
/// with the command and the flags applied (as runc does).
fn build_process(state: &ContainerState, a: &ExecArgs) -> anyhow::Result<Value> {
    if let Some(path) = &a.process {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --process file {}", path.display()))?;
        let p: oci_spec::runtime::Process = serde_json::from_str(&text).with_context(|| {
            format!(
                "invalid --process file {}: it must be an OCI process JSON object",
                path.display()
            )
        })?;
        if p.args().as_ref().is_none_or(|a| a.is_empty()) {
            anyhow::bail!("invalid --process file {}: args is empty", path.display());
        }
        return Ok(serde_json::to_value(p)?);
    }
    if a.command.is_empty() {
        anyhow::bail!("exec needs a command to run (or --process FILE)");
    }
    let bundle = Bundle::load(&state.bundle)?;
    let base = bundle.spec.process().clone().unwrap_or_default();
    let mut p = serde_json::to_value(base)?;
    p["args"] = json!(a.command);
    p["terminal"] = json!(a.tty);
    if let Some(o) = p.as_object_mut() {
        o.remove("consoleSize");
    }
    let mut env: Vec<String> = p["env"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for kv in &a.env {
        let key = kv.split('=').next().unwrap_or(kv);
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(kv.clone());
    }
    p["env"] = json!(env);
    if let Some(cwd) = &a.cwd {
        p["cwd"] = json!(cwd);
    }
    if let Some(u) = &a.user {
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (u.as_str(), None),
        };
        let uid: u32 = uid
            .parse()
            .with_context(|| format!("--user {u}: use numeric uid[:gid]"))?;
        p["user"]["uid"] = json!(uid);
        p["user"]["gid"] = json!(match gid {
            Some(g) => g
                .parse::<u32>()
                .with_context(|| format!("--user {u}: use numeric uid[:gid]"))?,
            None => 0,
        });
    }
    if !a.additional_gids.is_empty() {
        p["user"]["additionalGids"] = json!(a.additional_gids);
    }
    if a.no_new_privs {
        p["noNewPrivileges"] = json!(true);
    }
    if !a.cap.is_empty() {
        for set in [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ] {
            let list = p["capabilities"][set]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut list: Vec<Value> = list;
            for c in &a.cap {
                let c = c.to_ascii_uppercase();
                let c = if c.starts_with("CAP_") {
                    c
                } else {
                    format!("CAP_{c}")
                };
                if !list.iter().any(|x| x == &json!(c)) {
                    list.push(json!(c));
                }
            }
            p["capabilities"][set] = json!(list);
        }
    }
    Ok(p)
}

pub fn exec(g: &GlobalOpts, a: ExecArgs) -> anyhow::Result<u8> {
    let t = super::Target::open(g, &a.id)?;
    t.require(Verb::Exec)?;
    let process = build_process(&t.state, &a)?;
    let tty = process["terminal"].as_bool().unwrap_or(false);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let exec_id = format!("exec-{}-{nanos}", std::process::id());
    let stdio = match (&a.console_socket, tty) {
        (Some(s), true) => ExecStdio::ConsoleSocket(s.clone()),
        _ => ExecStdio::Fds,
    };
    let fds: Vec<i32> = if stdio == ExecStdio::Fds {
        vec![0, 1, 2]
    } else {
        Vec::new()
    };
    let stdin = std::io::stdin();
    let raw = if tty && stdio == ExecStdio::Fds && console::is_terminal(stdin.as_fd()) {
        console::make_raw(stdin.as_fd()).ok()
    } else {
        None
    };
    let mut client = MonitorClient::connect(&t.dir, &a.id)?;
    let begun = client.begin(
        &Request::Exec {
            exec_id: exec_id.clone(),
            process: Box::new(
                serde_json::from_value(process)
                    .map_err(|e| anyhow::anyhow!("invalid process: {e}"))?,
            ),
            stdio,
        },
        &fds,
    );
    if let Err(e) = begun {
        if let Some(saved) = &raw {
            console::restore(stdin.as_fd(), saved);
        }
        return Err(e.into());
    }
    let dir = t.dir.clone();
    let id = a.id.clone();
    drop(t);

    if a.detach {
        // The pid in --pid-file must live as long as the process and exit
        // with its status: a child of ours that waits for the Exit reply.
        // No thread has been started yet, so the child may run any code.
        match husk_sys::fork_single_threaded().context("cannot fork")? {
            husk_sys::Forked::Parent { child } => {
                if let Some(p) = &a.pid_file {
                    super::write_pid_file(p, child)?;
                }
                return Ok(0);
            }
            husk_sys::Forked::Child => {
                // The waiter needs none of the caller's stdio (the process's
                // is with the monitor): a caller reading to the end of its
                // own output is not held by it.
                if let Ok(null) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    let _ = nix::unistd::dup2_stdin(&null);
                    let _ = nix::unistd::dup2_stdout(&null);
                    let _ = nix::unistd::dup2_stderr(&null);
                }
                let code = client.wait_exit().map(|s| s.clamp(0, 255)).unwrap_or(255);
                std::process::exit(code);
            }
        }
    }
    if let Some(p) = &a.pid_file {
        super::write_pid_file(p, std::process::id())?;
    }
    forward_signals(dir, id, exec_id, tty);
    let status = client.wait_exit();
    if let Some(saved) = &raw {
        console::restore(stdin.as_fd(), saved);
    }
    Ok(u8::try_from(status?.clamp(0, 255)).unwrap_or(255))
}

/// Passes the signals husk receives to the exec'd process, and terminal
/// size changes to its pty.
fn forward_signals(dir: std::path::PathBuf, id: String, exec_id: String, tty: bool) {
    let sigs = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH];
    let Ok(mut signals) = signal_hook::iterator::Signals::new(sigs) else {
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let req = if sig == SIGWINCH {
                match console::window_size(std::io::stdin().as_fd()) {
                    Some((rows, cols)) if tty => Request::Resize {
                        exec_id: exec_id.clone(),
                        rows,
                        cols,
                    },
                    _ => continue,
                }
            } else {
                Request::Kill {
                    signal: sig,
                    all: false,
                    exec_id: exec_id.clone(),
                }
            };
            if let Ok(c) = MonitorClient::connect(&dir, &id) {
                let _ = c.call(&req, &[]);
            }
        }
    });
}
