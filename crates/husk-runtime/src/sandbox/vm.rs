//! The task that owns a sandbox's VM handle: it notices the VM's exit at
//! once (published on a watch channel) and stops the VM on request.

use std::time::Duration;

use husk_hypervisor::{Vm, VmExit};
use tokio::sync::{mpsc, oneshot, watch};

/// How long QEMU gets to quit before it is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A handle on the task that owns the VM. Dropping every handle stops the VM.
pub struct VmOwner {
    pid: u32,
    stop: mpsc::Sender<oneshot::Sender<()>>,
    exit: watch::Receiver<Option<VmExit>>,
}

impl VmOwner {
    pub fn spawn(mut vm: Box<dyn Vm>) -> VmOwner {
        let pid = vm.pid();
        let (stop_tx, mut stop_rx) = mpsc::channel::<oneshot::Sender<()>>(4);
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let mut exited = false;
            loop {
                tokio::select! {
                    exit = vm.wait(), if !exited => {
                        exited = true;
                        exit_tx.send_replace(Some(exit));
                    }
                    req = stop_rx.recv() => {
                        if !exited {
                            match vm.shutdown(SHUTDOWN_GRACE).await {
                                Ok(exit) => { exit_tx.send_replace(Some(exit)); }
                                Err(e) => tracing::warn!(error = %e, "stopping the VM"),
                            }
                        }
                        if let Some(reply) = req {
                            let _ = reply.send(());
                        }
                        // The Vm handle goes with the task (its Drop kills
                        // whatever is left).
                        return;
                    }
                }
            }
        });
        VmOwner {
            pid,
            stop: stop_tx,
            exit: exit_rx,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some` once the VM has exited.
    pub fn exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }

    pub fn exited(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Stops the VM (QMP quit, then kill) and waits until it is gone.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.stop.send(tx).await.is_ok() {
            let _ = rx.await;
        }
    }
}
