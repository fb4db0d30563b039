//! `containerd-shim-husk-v2`: the containerd shim v2 for husk
//! (`--runtime io.containerd.husk.v2`). One shim process per pod owns the
//! pod's VM; the task service is built on the `containerd-shim` crate, the
//! lifecycle on `husk-runtime` (the same library as the `husk` CLI).
//!
//! containerd runs this binary three ways: `start` (spawn or find the
//! shim of the pod and print its address), `delete` (clean up after a shim
//! that died), and, from `start`, with no action: the long-lived server.

mod container;
mod error;
mod events;
mod io;
mod logging;
mod metrics;
mod options;
mod rootfs;
mod service;
mod task;

use std::process::ExitCode;
use std::time::Duration;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("{}:", args[0].to_string_lossy());
        println!("  Version:  {}", env!("CARGO_PKG_VERSION"));
        println!("  Runtime:  {RUNTIME_ID}");
        return ExitCode::SUCCESS;
    }
    if flags.action.is_empty()
        && (flags.socket.is_empty() || std::env::var_os("TTRPC_ADDRESS").is_none())
    {
        eprintln!(
            "{RUNTIME_ID}: this is containerd's shim for husk; containerd runs it \
             (`ctr run --runtime {RUNTIME_ID} ...`), with the actions `start` and `delete` \
             or as the server (-socket, $TTRPC_ADDRESS)"
        );
        return ExitCode::from(2);
    }
    match flags.action.as_str() {
        // The server owns the pod: the share's bind mounts (and the rootfs
        // mounts it makes) must live in a mount namespace of its own, so the
        // host never sees them and the kernel drops them when the shim dies.
        // unshare(CLONE_NEWNS) needs a single-threaded process: before tokio.
        "" => {
            if let Err(e) = husk_runtime::mountns::enter_private() {
                eprintln!("{RUNTIME_ID}: cannot create a private mount namespace (the shim needs root): {e}");
                return ExitCode::from(1);
            }
            logging::init_server(flags.debug);
        }
        // containerd logs what `delete` writes to stderr.
        "delete" => logging::init_stderr(),
        // containerd reads `start`'s combined output as the address: no logs.
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let config = containerd_shim::Config {
        // Logging is ours (tracing, into containerd's log FIFO).
        no_setup_logger: true,
        default_log_level: "info".into(),
        // The shim's children (QEMU, virtiofsd, hooks) are tokio's to wait
        // for; a reaper calling waitpid(-1) would steal their statuses.
        no_reaper: true,
        no_sub_reaper: true,
    };
    rt.block_on(containerd_shim::asynchronous::run::<service::Service>(
        RUNTIME_ID,
        Some(config),
    ));
    // A relay blocked on a FIFO must not keep the process alive.
    rt.shutdown_timeout(Duration::from_secs(1));
    ExitCode::SUCCESS
}
