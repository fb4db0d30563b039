//! Pods: which sandbox a container belongs to, from the CRI annotations,
//! and the clean-up of a sandbox whose owner process died.
//!
//! A container whose `io.kubernetes.cri.container-type` is `container`
//! joins the pod named by `io.kubernetes.cri.sandbox-id`; any other
//! container (the CRI sandbox container, or a container without the
//! annotations) starts a pod, a [`crate::sandbox::Sandbox`], of its own,
//! and the pod's VM goes away with it.
//!
//! A sandbox's state dir (`<root>/<id>`) holds a `state.json` naming the
//! owner process and the VM, so [`cleanup_dead`] can remove what an owner
//! that died left behind (the CLI's `delete` and the shim's both use it).

use std::path::Path;
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;

use crate::sandbox_dir::{self, SandboxDirError};
use crate::state::{self, ContainerState};

/// `sandbox` for the CRI sandbox (pause) container, `container` for the
/// others of the pod.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The id of the pod (its sandbox container) a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod's memory limit in bytes (set by containerd 1.7 and later).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's CPU quota and period in µs (set by containerd 1.7 and later).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Where a container goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// It starts a pod (and a VM) of its own, named by its id.
    Owner,
    /// It joins the running pod `sandbox_id`.
    Member { sandbox_id: String },
}

pub(crate) fn annotation<'a>(spec: &'a Spec, key: &str) -> Option<&'a str> {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Reads a container's place from its spec's CRI annotations.
pub fn membership(spec: &Spec) -> Membership {
    match (
        annotation(spec, CONTAINER_TYPE),
        annotation(spec, SANDBOX_ID),
    ) {
        (Some("container"), Some(sandbox)) => Membership::Member {
            sandbox_id: sandbox.to_string(),
        },
        _ => Membership::Owner,
    }
}

/// What a pod's members are checked against: how its owner was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOrigin {
    /// The owner is a CRI sandbox container (`container-type: sandbox`).
    pub cri_sandbox: bool,
    /// The host network namespace the owner's spec names (CNI's, under CRI).
    pub netns: Option<String>,
}

impl PodOrigin {
    pub fn of(owner: &Spec) -> PodOrigin {
        PodOrigin {
            cri_sandbox: annotation(owner, CONTAINER_TYPE) == Some("sandbox"),
            netns: netns_path(owner),
        }
    }

    /// Whether the container `cid` (with `member`) may join this pod,
    /// `pod`, whose tasks containerd knows by `host_pid`. It may only as
    /// containerd's CRI makes pod members: the owner is a CRI sandbox, and
    /// when the owner has a network namespace of its own (a pod network
    /// from CNI), the member names it, either by its path or as the
    /// sandbox task's (`/proc/<pid>/ns/net`). A client that merely sets
    /// the sandbox-id annotation on another container gets an error.
    pub fn admits(&self, pod: &str, host_pid: u32, cid: &str, member: &Spec) -> Result<(), String> {
        if !self.cri_sandbox {
            return Err(format!(
                "container {cid} does not join pod {pod}: pod {pod} was not created through CRI \
                 (its first container has no {CONTAINER_TYPE}=sandbox annotation)"
            ));
        }
        let Some(pod_netns) = &self.netns else {
            return Ok(());
        };
        let by_pid = format!("/proc/{host_pid}/ns/net");
        match netns_path(member) {
            Some(p) if p == *pod_netns || p == by_pid => Ok(()),
            other => Err(format!(
                "container {cid} does not join pod {pod}: its network namespace ({}) is not the \
                 pod's ({pod_netns} or {by_pid}), as containerd's CRI would set it; run it through \
                 CRI, or as a pod of its own without the {SANDBOX_ID} annotation",
                other.as_deref().unwrap_or("a new one")
            )),
        }
    }
}

/// The path of the spec's network namespace, if it names one.
fn netns_path(spec: &Spec) -> Option<String> {
    crate::net::spec_netns(spec).map(|p| p.to_string_lossy().into_owned())
}

/// The id of the pod a container (`cid`, with `spec`) belongs to.
pub fn pod_id(cid: &str, spec: &Spec) -> String {
    match membership(spec) {
        Membership::Owner => cid.to_string(),
        Membership::Member { sandbox_id } => sandbox_id,
    }
}

/// How long [`cleanup_dead`] waits for an owner that is on its way out.
const OWNER_EXIT_WAIT: Duration = Duration::from_secs(2);

/// What [`cleanup_dead`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// No state dir: nothing to do.
    Absent,
    /// The owner still runs; it owns the pod and nothing was touched.
    OwnerAlive(i32),
    /// The owner was gone; its leftovers were removed.
    Removed,
}

/// Removes what the dead owner of pod `id` (in `<root>/<id>`) left behind:
/// the VM and virtiofsd if they still run (they die with their owner, so
/// normally they are gone), and the state dir. The share's bind mounts
/// lived in the owner's private mount namespace and went with it; only
/// their empty mount points are removed, never content.
pub fn cleanup_dead(root: &Path, id: &str) -> Result<Cleanup, SandboxDirError> {
    sandbox_dir::validate_id(id)?;
    let dir = root.join(id);
    if !dir.is_dir() {
        return Ok(Cleanup::Absent);
    }
    match ContainerState::load(&dir, id) {
        Ok(st) => {
            // The caller (containerd's `shim delete`) asks once the owner's
            // connection is gone: an owner that still looks alive is
            // usually still exiting (a SIGKILLed shim closes its sockets
            // before it is reaped). Give it a moment.
            let t0 = Instant::now();
            while st.monitor_alive() && t0.elapsed() < OWNER_EXIT_WAIT {
                std::thread::sleep(Duration::from_millis(10));
            }
            if st.monitor_alive() {
                return Ok(Cleanup::OwnerAlive(st.pid));
            }
            if let Some(pid) = st.vm_pid {
                kill_if_mentions(pid as i32, &dir);
            }
        }
        // No or unreadable state: the owner died while creating it.
        Err(e) => tracing::debug!(error = %e, "pod state"),
    }
    if let Ok(pid) = std::fs::read_to_string(dir.join("virtiofsd.sock.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            kill_if_mentions(pid, &dir);
        }
    }
    sandbox_dir::remove_leftovers(&dir);
    Ok(Cleanup::Removed)
}

/// SIGKILLs `pid` if its command line names `dir` (so a recycled pid is
/// left alone), and waits a moment for it to go.
pub fn kill_if_mentions(pid: i32, dir: &Path) {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let needle = dir.to_string_lossy();
    if !String::from_utf8_lossy(&cmd).contains(needle.as_ref()) {
        return;
    }
    tracing::info!(pid, "killing a process a dead sandbox owner left");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let t0 = Instant::now();
    while state::process_start_time(pid).is_some() && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizing::tests::spec;

    #[test]
    fn membership_follows_the_cri_annotations() {
        let none = spec(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(membership(&none), Membership::Owner);
        assert_eq!(pod_id("c1", &none), "c1");
        let sandbox = spec(
            serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}),
            serde_json::json!({}),
        );
        assert_eq!(membership(&sandbox), Membership::Owner);
        assert_eq!(pod_id("p1", &sandbox), "p1");
        let member = spec(
            serde_json::json!({CONTAINER_TYPE: "container", SANDBOX_ID: "p1"}),
            serde_json::json!({}),
        );
        assert_eq!(
            membership(&member),
            Membership::Member {
                sandbox_id: "p1".into()
            }
        );
        assert_eq!(pod_id("c2", &member), "p1");
        // A member that does not say which pod is a pod of its own.
        let lost = spec(
            serde_json::json!({CONTAINER_TYPE: "container"}),
            serde_json::json!({}),
        );
        assert_eq!(membership(&lost), Membership::Owner);
    }

    fn with_netns(annotations: serde_json::Value, netns: Option<&str>) -> Spec {
        let mut ns = serde_json::json!({"type": "network"});
        if let Some(p) = netns {
            ns["path"] = p.into();
        }
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": annotations,
            "linux": {"namespaces": [ns]}
        }))
        .unwrap()
    }

    #[test]
    fn only_cri_made_members_join_a_pod() {
        let member = |netns: Option<&str>| {
            with_netns(
                serde_json::json!({CONTAINER_TYPE: "container", SANDBOX_ID: "p1"}),
                netns,
            )
        };
        // A pod whose first container is no CRI sandbox admits nobody.
        let plain = PodOrigin::of(&with_netns(serde_json::json!({}), None));
        let e = plain.admits("p1", 42, "c2", &member(None)).unwrap_err();
        assert!(e.contains("not created through CRI"), "{e}");
        // A CRI sandbox without a network of its own: the annotations do.
        let bare = PodOrigin::of(&with_netns(
            serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}),
            None,
        ));
        assert_eq!(bare.admits("p1", 42, "c2", &member(None)), Ok(()));
        // A CRI pod with CNI's netns: the member must name it.
        let cni = PodOrigin::of(&with_netns(
            serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}),
            Some("/var/run/netns/cni-1"),
        ));
        assert_eq!(cni.netns.as_deref(), Some("/var/run/netns/cni-1"));
        assert_eq!(
            cni.admits("p1", 42, "c2", &member(Some("/proc/42/ns/net"))),
            Ok(())
        );
        assert_eq!(
            cni.admits("p1", 42, "c2", &member(Some("/var/run/netns/cni-1"))),
            Ok(())
        );
        for bad in [None, Some("/proc/43/ns/net"), Some("/var/run/netns/other")] {
            let e = cni.admits("p1", 42, "c2", &member(bad)).unwrap_err();
            assert!(e.contains("does not join pod p1"), "{e}");
        }
    }

    #[test]
    fn cleanup_leaves_a_live_owner_alone() {
        let root = std::env::temp_dir().join(format!("husk-pod-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(cleanup_dead(&root, "p").unwrap(), Cleanup::Absent);
        let dir = root.join("p");
        std::fs::create_dir_all(dir.join("share/c/rootfs")).unwrap();
        let me = std::process::id() as i32;
        let mut st = ContainerState {
            id: "p".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status: crate::status::Status::Running,
            pid: me,
            pid_start_time: state::process_start_time(me).unwrap(),
            created: state::now_rfc3339(),
            annotations: Default::default(),
            owner: String::new(),
            exit_status: None,
            vm_pid: None,
            poststop: Vec::new(),
        };
        st.save(&dir).unwrap();
        assert_eq!(cleanup_dead(&root, "p").unwrap(), Cleanup::OwnerAlive(me));
        assert!(dir.join("share/c/rootfs").is_dir());
        // A dead owner (another start time): everything goes.
        st.pid_start_time += 1;
        st.save(&dir).unwrap();
        std::fs::write(dir.join("console.log"), "x").unwrap();
        assert_eq!(cleanup_dead(&root, "p").unwrap(), Cleanup::Removed);
        assert!(!dir.exists());
        std::fs::remove_dir(&root).unwrap();
    }
}
