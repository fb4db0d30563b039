//! Fakes of a sandbox's parts, for unit tests here and in the front ends:
//! a VM that "runs" until told to die, and a share that records binds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use husk_hypervisor::{HypervisorError, Vm, VmExit};
use tokio::sync::watch;

use super::{Parts, ShareBinds};
use crate::agent::fake::FakeAgent;
use crate::agent::{AgentClient, AgentInfo};
use crate::sandbox_dir::SandboxDir;
use crate::share::ShareError;
use crate::state::ContainerState;
use crate::translate::ShareBind;

/// A VM that exits when [`FakeVmControl::die`] is called or it is shut down.
pub struct FakeVm {
    exit: watch::Receiver<Option<VmExit>>,
    ctl: FakeVmControl,
}

#[derive(Clone)]
pub struct FakeVmControl {
    tx: Arc<watch::Sender<Option<VmExit>>>,
    shutdowns: Arc<Mutex<u32>>,
}

impl FakeVmControl {
    /// The VM dies (as if QEMU were killed).
    pub fn die(&self) {
        self.tx.send_replace(Some(VmExit::Signal(libc::SIGKILL)));
    }
    pub fn shutdowns(&self) -> u32 {
        *self.shutdowns.lock().expect("lock")
    }
    pub fn exited(&self) -> bool {
        self.tx.borrow().is_some()
    }
}

impl FakeVm {
    pub fn new() -> (FakeVm, FakeVmControl) {
        let (tx, rx) = watch::channel(None);
        let ctl = FakeVmControl {
            tx: Arc::new(tx),
            shutdowns: Arc::new(Mutex::new(0)),
        };
        (
            FakeVm {
                exit: rx,
                ctl: ctl.clone(),
            },
            ctl,
        )
    }
}

#[async_trait]
impl Vm for FakeVm {
    fn pid(&self) -> u32 {
        4242
    }
    async fn wait(&mut self) -> VmExit {
        let got = self.exit.wait_for(Option::is_some).await.map(|e| e.clone());
        match got {
            Ok(Some(e)) => e,
            _ => std::future::pending().await,
        }
    }
    async fn shutdown(&mut self, _grace: Duration) -> Result<VmExit, HypervisorError> {
        *self.ctl.shutdowns.lock().expect("lock") += 1;
        self.ctl.tx.send_replace(Some(VmExit::Code(0)));
        Ok(VmExit::Code(0))
    }
    async fn pause(&mut self) -> Result<(), HypervisorError> {
        Ok(())
    }
    async fn resume(&mut self) -> Result<(), HypervisorError> {
        Ok(())
    }
    async fn save_template(&mut self, _state: &std::path::Path) -> Result<(), HypervisorError> {
        Err(HypervisorError::Template(
            "a fake VM has no state to save".into(),
        ))
    }
}

/// Records which container has which binds.
#[derive(Clone, Default)]
pub struct FakeShare {
    pub binds: Arc<Mutex<HashMap<String, Vec<ShareBind>>>>,
    pub torn_down: Arc<Mutex<bool>>,
    /// Binding fails with this message.
    pub fail: Arc<Mutex<Option<String>>>,
}

impl FakeShare {
    pub fn bound(&self) -> Vec<String> {
        let mut v: Vec<String> = self.binds.lock().expect("lock").keys().cloned().collect();
        v.sort();
        v
    }
}

impl ShareBinds for FakeShare {
    fn bind_container(&mut self, cid: &str, binds: &[ShareBind]) -> Result<(), ShareError> {
        if let Some(m) = self.fail.lock().expect("lock").clone() {
            return Err(ShareError::MissingSource(m.into()));
        }
        self.binds
            .lock()
            .expect("lock")
            .insert(cid.to_string(), binds.to_vec());
        Ok(())
    }
    fn unbind_container(&mut self, cid: &str) -> Result<(), ShareError> {
        self.binds.lock().expect("lock").remove(cid);
        Ok(())
    }
    fn teardown(&mut self) {
        self.binds.lock().expect("lock").clear();
        *self.torn_down.lock().expect("lock") = true;
    }
}

/// A sandbox `id` made of fakes, its state dir under `root`.
pub struct FakeSandbox {
    pub sandbox: Arc<super::Sandbox>,
    pub agent: Arc<FakeAgent>,
    pub vm: FakeVmControl,
    pub share: FakeShare,
}

pub fn sandbox(root: &std::path::Path, id: &str) -> FakeSandbox {
    sandbox_in(SandboxDir::create(root, id).expect("state dir"), id, root)
}

/// A sandbox `id` made of fakes in the state dir `dir`, its owner's bundle
/// at `bundle`.
pub fn sandbox_in(dir: SandboxDir, id: &str, bundle: &std::path::Path) -> FakeSandbox {
    sandbox_with_network(dir, id, bundle, None)
}

/// As [`sandbox_in`], with `guest_network` to be told to the guest with the
/// owner's CreateContainer.
pub fn sandbox_with_network(
    dir: SandboxDir,
    id: &str,
    bundle: &std::path::Path,
    guest_network: Option<crate::net::GuestNetwork>,
) -> FakeSandbox {
    let agent = FakeAgent::new();
    let (vm, ctl) = FakeVm::new();
    let share = FakeShare::default();
    let me = std::process::id() as i32;
    let record = ContainerState {
        id: id.to_string(),
        bundle: bundle.to_path_buf(),
        rootfs: bundle.join("rootfs"),
        status: crate::status::Status::Creating,
        pid: me,
        pid_start_time: crate::state::process_start_time(me).unwrap_or(0),
        created: crate::state::now_rfc3339(),
        annotations: Default::default(),
        owner: String::new(),
        exit_status: None,
        vm_pid: None,
        poststop: Vec::new(),
    };
    let parts = Parts {
        vm: Box::new(vm),
        agent: AgentClient::new(agent.clone()),
        share: Box::new(share.clone()),
        dir,
        info: AgentInfo {
            api_version: husk_protocol::API_VERSION,
            agent_version: "fake".into(),
            kernel_release: "6.1.0-fake".into(),
        },
        shared_fs: "virtiofs",
        host_cgroup: None,
        network: None,
        guest_network: guest_network.clone(),
    };
    FakeSandbox {
        sandbox: super::Sandbox::new(parts, record, super::HostPid::Owner),
        agent,
        vm: ctl,
        share,
    }
}
