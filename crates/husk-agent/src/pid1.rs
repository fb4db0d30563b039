//! The agent as PID 1 of the VM: early mounts, console, logging, and a serve
//! loop that never exits (PID 1 exiting panics the kernel).

use std::fs;
use std::os::fd::AsFd;
use std::time::Duration;

use husk_protocol::agent::Storage;
use husk_protocol::{GUEST_SHARE_DIR, KERNEL_SHARE_PARAM, SHARE_TAG};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::channel::{port_listener, PortLocation};
use crate::container::ContainerOptions;
use crate::rpc::ShutdownAction;
use crate::{logging, server};

/// One early mount: `(source, target, fstype, flags, data)`.
type EarlyMount = (
    &'static str,
    &'static str,
    &'static str,
    MsFlags,
    Option<&'static str>,
);

/// The cgroup2 mount option (Linux 6.0+) that makes cgroup migrations cheap.
const CGROUP_FAVOR_DYNMODS: &str = "favordynmods";

/// What the guest needs before anything else, in order.
pub fn early_mounts() -> Vec<EarlyMount> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        ("proc", "/proc", "proc", common, None),
        ("sysfs", "/sys", "sysfs", common, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        // favordynmods: moving a process into a cgroup (each container's
        // init) otherwise waits for an RCU grace period on the cgroup
        // rwsem's write side: measured 30 ms per container under TCG, 8 ms
        // with it, for a slightly dearer fork and exit.
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            common,
            Some(CGROUP_FAVOR_DYNMODS),
        ),
    ]
}

/// Performs the early mounts; returns the problems (logged once logging is
/// up). Something already mounted there (EBUSY) is fine.
fn mount_early() -> Vec<String> {
    let mut problems = Vec::new();
    for (source, target, fstype, flags, data) in early_mounts() {
        let _ = fs::create_dir_all(target);
        let mut result = mount(Some(source), target, Some(fstype), flags, data);
        if result == Err(Errno::EINVAL) && data == Some(CGROUP_FAVOR_DYNMODS) {
            // A kernel before 6.0: the option is only an optimisation.
            result = mount(Some(source), target, Some(fstype), flags, None::<&str>);
        }
        match result {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => problems.push(format!("mounting {fstype} on {target}: {e}")),
        }
    }
    problems
}

/// Makes sure fds 0-2 are open, on /dev/console (the kernel opens them only
/// when the initrd has /dev/console).
fn ensure_console() {
    let stdio_missing =
        (0..3).any(|fd| fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err());
    if !stdio_missing {
        return;
    }
    if let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        let _ = nix::unistd::dup2_stdin(console.as_fd());
        let _ = nix::unistd::dup2_stdout(console.as_fd());
        let _ = nix::unistd::dup2_stderr(console.as_fd());
    }
}

/// Powers the VM off: with `reboot=t` on the kernel command line and QEMU's
/// `-no-reboot`, a reboot ends QEMU. Only ever called as PID 1.
pub fn power_off() {
    tracing::info!("powering off");
    nix::unistd::sync();
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    tracing::error!("reboot failed: {e}");
}

/// Runs the agent as PID 1. Never returns.
pub fn run() -> ! {
    let mut problems = mount_early();
    // The guest's own network namespace (the sandbox's, which a container
    // without a network namespace of its own shares): `lo` up, as in every
    // new one (`container/init.rs`).
    if let Err(e) = crate::sys::set_loopback_up() {
        problems.push(format!(
            "bringing up the guest's loopback interface lo: {e}"
        ));
    }
    ensure_console();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let filter = logging::filter_from_cmdline(&cmdline)
        .unwrap_or_else(|| logging::DEFAULT_FILTER.to_string());
    logging::init(&filter);
    for problem in problems {
        tracing::warn!("{problem}");
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "husk-agent running as PID 1"
    );
    let options = ContainerOptions {
        early_storage: early_storage(&cmdline),
        ..ContainerOptions::default()
    };
    loop {
        let outcome = std::panic::catch_unwind(|| serve(options.clone()));
        match outcome {
            Ok(Err(e)) => tracing::error!("the agent stopped serving: {e}; restarting it"),
            Ok(Ok(never)) => match never {},
            Err(_) => tracing::error!("the agent panicked; restarting it"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The sandbox share named by `husk.share=DRIVER` on the kernel command line.
fn early_storage(cmdline: &str) -> Option<Storage> {
    let driver = logging::cmdline_value(cmdline, KERNEL_SHARE_PARAM)?;
    Some(Storage {
        driver,
        source: SHARE_TAG.to_string(),
        mount_point: GUEST_SHARE_DIR.to_string(),
        ..Default::default()
    })
}

fn serve(options: ContainerOptions) -> std::io::Result<std::convert::Infallible> {
    let runtime = server::runtime()?;
    runtime.block_on(async {
        let _agent = server::start(
            port_listener(PortLocation::default()),
            options,
            ShutdownAction::RebootGuest,
        )
        .await?;
        std::future::pending().await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_named_on_the_command_line_is_mounted_early() {
        let s = early_storage("quiet husk.log=warn husk.share=9p").unwrap();
        assert_eq!(
            (s.driver.as_str(), s.source.as_str(), s.mount_point.as_str()),
            ("9p", SHARE_TAG, GUEST_SHARE_DIR)
        );
        assert!(early_storage("quiet husk.log=warn").is_none());
        assert!(early_storage("husk.share=").is_none());
    }

    #[test]
    fn early_mounts_come_in_dependency_order() {
        let targets: Vec<&str> = early_mounts().iter().map(|m| m.1).collect();
        for (i, target) in targets.iter().enumerate() {
            // Every mount's parent mount point comes before it.
            for (j, other) in targets.iter().enumerate() {
                if target != other && target.starts_with(&format!("{other}/")) {
                    assert!(j < i, "{other} must be mounted before {target}");
                }
            }
        }
        assert!(targets.contains(&"/sys/fs/cgroup"));
        assert!(targets.contains(&"/dev/pts"));
    }
}
