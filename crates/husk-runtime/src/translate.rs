//! Translating a host OCI spec into the spec the guest agent runs: the one
//! place where host paths become guest paths.
//!
//! - `root.path` becomes the rootfs inside the sandbox share
//!   (`<GUEST_SHARE_DIR>/<container>/rootfs`).
//! - Bind mounts of host files and directories are shared too
//!   (`<container>/mounts/<n>`) and their sources rewritten. Sources named
//!   under `/dev`, `/proc` and `/sys` (plain names, no `.` or `..`) name the
//!   guest's own and are left alone. Any other source is resolved on the
//!   host (`..`, symlinks) and refused if it leads into the host's `/dev`,
//!   `/proc` or `/sys`: those must never reach the guest. The share checks
//!   the opened tree once more (`share.rs`).
//! - Read-only binds and a read-only rootfs are marked so: the share makes
//!   them read-only on the host side, not only in the guest.
//! - Namespace paths name host namespaces, which the guest cannot join; they
//!   are dropped (the container gets fresh namespaces in the guest), except
//!   for a pod member (`pod::membership`): its network, IPC and UTS paths,
//!   and its PID path (CRI sets one when `NamespaceOption.pid` is `POD`),
//!   all pointing at the sandbox container's pid, become
//!   `husk_protocol::CONTAINER_NS_PREFIX` + the sandbox id, and the agent
//!   joins the namespaces of the sandbox container's init in the guest.
//! - Hooks run on the host and are not sent to the guest.
//! - Resources that name host hardware are not sent either:
//!   `cpu.cpus`/`cpu.mems` (host CPUs and NUMA nodes: the VM is pinned to
//!   the CPUs instead, see `sizing.rs`) and the per-device `blockIO` lists
//!   (host block devices, which the guest does not have; the container's
//!   files reach it over the share). `blockIO.weight` stays.

use std::path::{Path, PathBuf};

use husk_protocol::{CONTAINER_NS_PREFIX, GUEST_SHARE_DIR};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

/// A host path the host must bind-mount into the share before the agent
/// builds the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareBind {
    pub host_source: PathBuf,
    /// Relative to the share directory.
    pub share_path: PathBuf,
    pub is_dir: bool,
    /// Read-only in the share on the host side (`ro`, `root.readonly`).
    pub readonly: bool,
    /// For a read-only rootfs: the mount points the guest will need in it
    /// (path inside the rootfs, `true` for a file), made on the host before
    /// the bind, since the guest cannot make them in a read-only share.
    pub mount_targets: Vec<(PathBuf, bool)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("bind-mount source {source_path} leads to {resolved}, inside the host's /dev, /proc or /sys: refused (name /dev, /proc or /sys directly to mount the guest's own)")]
    HostKernelPath {
        source_path: PathBuf,
        resolved: PathBuf,
    },
}

/// The guest spec and the binds it relies on.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub spec: Spec,
    pub binds: Vec<ShareBind>,
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

const GUEST_OWNED: [&str; 3] = ["/dev", "/proc", "/sys"];

fn under_guest_owned(p: &Path) -> bool {
    GUEST_OWNED.iter().any(|pre| p.starts_with(pre))
}

/// A source that names the guest's own `/dev`, `/proc` or `/sys`: an
/// absolute path under one of them made of plain names only.
fn is_guest_owned(p: &Path) -> bool {
    use std::path::Component;
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && under_guest_owned(p)
}

/// The host path `p` leads to: resolved (`..`, symlinks) when it exists,
/// refused when that is inside the host's `/dev`, `/proc` or `/sys`. A path
/// that does not exist is returned as it is (the share reports it missing,
/// and checks the opened tree again).
fn resolve_host(p: &Path) -> Result<PathBuf, TranslateError> {
    let (resolved, exists) = match std::fs::canonicalize(p) {
        Ok(r) => (r, true),
        Err(_) => (lexical(p), false),
    };
    if under_guest_owned(&resolved) {
        return Err(TranslateError::HostKernelPath {
            source_path: p.to_path_buf(),
            resolved,
        });
    }
    Ok(if exists { resolved } else { p.to_path_buf() })
}

/// `p` with `.` and `..` folded away by text (for a path that does not
/// exist, so has no symlinks to follow).
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether mount options leave the mount read-only (the last of `ro`/`rw`).
fn is_readonly(m: &Mount) -> bool {
    m.options()
        .as_ref()
        .and_then(|o| o.iter().rev().find(|x| *x == "ro" || *x == "rw"))
        .is_some_and(|x| x == "ro")
}

/// Translates `spec` (from the bundle at `bundle_dir`, rootfs at `rootfs`)
/// for container `cid`.
pub fn guest_spec(
    spec: &Spec,
    cid: &str,
    bundle_dir: &Path,
    rootfs: &Path,
) -> Result<GuestSpec, TranslateError> {
    let mut spec = spec.clone();
    let guest_dir = Path::new(GUEST_SHARE_DIR).join(cid);
    let mut binds = vec![ShareBind {
        host_source: resolve_host(rootfs)?,
        share_path: Path::new(cid).join("rootfs"),
        is_dir: true,
        readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        mount_targets: Vec::new(),
    }];

    if let Some(mut root) = spec.root().clone() {
        root.set_path(guest_dir.join("rootfs"));
        spec.set_root(Some(root));
    }

    if let Some(mounts) = spec.mounts_mut() {
        for (n, m) in mounts.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            let Some(src) = m.source().clone() else {
                continue;
            };
            let host = if src.is_absolute() {
                src
            } else {
                bundle_dir.join(src)
            };
            if is_guest_owned(&host) {
                continue;
            }
            let host = resolve_host(&host)?;
            let share_path = Path::new(cid).join("mounts").join(n.to_string());
            m.set_source(Some(Path::new(GUEST_SHARE_DIR).join(&share_path)));
            binds.push(ShareBind {
                is_dir: !host.is_file(),
                readonly: is_readonly(m),
                host_source: host,
                share_path,
                mount_targets: Vec::new(),
            });
        }
    }

    let pod = match crate::pod::membership(&spec) {
        crate::pod::Membership::Member { sandbox_id } => Some(sandbox_id),
        crate::pod::Membership::Owner => None,
    };
    if let Some(linux) = spec.linux_mut() {
        if let Some(nss) = linux.namespaces_mut() {
            for ns in nss.iter_mut() {
                if ns.path().is_none() {
                    continue;
                }
                let shared_by_pod = matches!(
                    ns.typ(),
                    LinuxNamespaceType::Network
                        | LinuxNamespaceType::Ipc
                        | LinuxNamespaceType::Uts
                        | LinuxNamespaceType::Pid
                );
                match &pod {
                    Some(sandbox) if shared_by_pod => {
                        let guest = format!("{CONTAINER_NS_PREFIX}{sandbox}");
                        tracing::debug!(ns = ?ns.typ(), host = ?ns.path(), guest, "a pod member joins its sandbox container's namespace");
                        ns.set_path(Some(PathBuf::from(guest)));
                    }
                    _ => {
                        tracing::debug!(ns = ?ns.typ(), "dropping a host namespace path: the guest cannot join it");
                        ns.set_path(None);
                    }
                }
            }
        }
    }
    if let Some(resources) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.resources_mut().as_mut())
    {
        if let Some(cpu) = resources.cpu_mut() {
            if cpu.cpus().is_some() || cpu.mems().is_some() {
                tracing::debug!(cpus = ?cpu.cpus(), mems = ?cpu.mems(), "host CPUs and memory nodes: applied to the VM, not in the guest");
                cpu.set_cpus(None);
                cpu.set_mems(None);
            }
        }
        if let Some(io) = resources.block_io_mut() {
            let per_device = io.weight_device().is_some()
                || io.throttle_read_bps_device().is_some()
                || io.throttle_write_bps_device().is_some()
                || io.throttle_read_iops_device().is_some()
                || io.throttle_write_iops_device().is_some();
            if per_device {
                tracing::warn!("linux.resources.blockIO names host block devices, which the guest does not have: those limits are not applied");
                io.set_weight_device(None);
                io.set_throttle_read_bps_device(None);
                io.set_throttle_write_bps_device(None);
                io.set_throttle_read_iops_device(None);
                io.set_throttle_write_iops_device(None);
            }
        }
    }
    if binds[0].readonly {
        let file_binds: Vec<&Path> = binds[1..]
            .iter()
            .filter(|b| !b.is_dir)
            .map(|b| b.share_path.as_path())
            .collect();
        binds[0].mount_targets = spec
            .mounts()
            .iter()
            .flatten()
            .filter(|m| m.destination().is_absolute() && m.destination() != Path::new("/"))
            .map(|m| {
                let is_file = m
                    .source()
                    .as_ref()
                    .is_some_and(|s| file_binds.iter().any(|f| s.ends_with(f)));
                (m.destination().clone(), is_file)
            })
            .collect();
    }
    spec.set_hooks(None);
    Ok(GuestSpec { spec, binds })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    const S: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "hooks": {"prestart": [{"path": "/bin/true"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "type": "none", "source": "/etc/hosts", "options": ["bind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["bind"]},
            {"destination": "/rel", "type": "bind", "source": "reldir", "options": ["bind"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/42/ns/net"}],
            "resources": {
                "cpu": {"cpus": "1", "mems": "0", "shares": 512},
                "blockIO": {"weight": 200, "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}]}
            }
        }
    }"#;

    #[test]
    fn root_and_binds_move_into_the_share() {
        let g = guest_spec(&spec(S), "c1", Path::new("/b"), Path::new("/b/rootfs")).unwrap();
        assert_eq!(
            g.spec.root().as_ref().unwrap().path(),
            Path::new("/run/husk/share/c1/rootfs")
        );
        let m = g.spec.mounts().as_ref().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            m[1].source().as_deref(),
            Some(Path::new("/run/husk/share/c1/mounts/1"))
        );
        assert_eq!(
            m[2].source().as_deref(),
            Some(Path::new("/run/husk/share/c1/mounts/2"))
        );
        assert_eq!(m[3].source().as_deref(), Some(Path::new("/dev/shm")));
        assert_eq!(
            m[4].source().as_deref(),
            Some(Path::new("/run/husk/share/c1/mounts/4"))
        );

        let srcs: Vec<_> = g.binds.iter().map(|b| b.host_source.clone()).collect();
        assert_eq!(
            srcs,
            vec![
                PathBuf::from("/b/rootfs"),
                PathBuf::from("/srv/data"),
                PathBuf::from("/etc/hosts"),
                PathBuf::from("/b/reldir"),
            ]
        );
        assert!(g.binds[0].is_dir);
        assert!(!g.binds[2].is_dir, "/etc/hosts is a file");
    }

    #[test]
    fn host_only_parts_are_dropped() {
        let g = guest_spec(&spec(S), "c1", Path::new("/b"), Path::new("/b/rootfs")).unwrap();
        assert!(g.spec.hooks().is_none());
        let nss = g
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        assert!(nss.iter().all(|n| n.path().is_none()));
        assert_eq!(nss.len(), 2);
        let r = g
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap();
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!(
            (cpu.cpus(), cpu.mems(), cpu.shares()),
            (&None, &None, Some(512))
        );
        let io = r.block_io().as_ref().unwrap();
        assert_eq!(io.weight(), Some(200));
        assert!(io.throttle_read_bps_device().is_none());
    }

    #[test]
    fn a_pod_member_joins_its_sandbox_namespaces() {
        let member = S.replace(
            r#""namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/42/ns/net"}]"#,
            r#""namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "network", "path": "/proc/42/ns/net"}, {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"}]"#,
        ).replace(
            r#""ociVersion": "1.0.2","#,
            r#""ociVersion": "1.0.2", "annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"},"#,
        );
        let g = guest_spec(
            &spec(&member),
            "c2",
            Path::new("/b"),
            Path::new("/b/rootfs"),
        )
        .unwrap();
        let nss = g
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        let paths: Vec<_> = nss
            .iter()
            .map(|n| n.path().as_ref().map(|p| p.to_string_lossy().into_owned()))
            .collect();
        let pod = Some("/run/husk/containers/pod1".to_string());
        assert_eq!(
            paths,
            [pod.clone(), pod.clone(), pod.clone(), pod, None],
            "pid (NamespaceOption.pid = POD), network, IPC and UTS are the sandbox's"
        );

        // pid = CONTAINER: CRI gives the member a PID namespace of its own
        // (no path), and so does the guest.
        let own_pid = member.replace(
            r#"{"type": "pid", "path": "/proc/42/ns/pid"}"#,
            r#"{"type": "pid"}"#,
        );
        let g = guest_spec(
            &spec(&own_pid),
            "c2",
            Path::new("/b"),
            Path::new("/b/rootfs"),
        )
        .unwrap();
        let nss = g
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert_eq!(nss[0].typ(), LinuxNamespaceType::Pid);
        assert!(nss[0].path().is_none());
    }

    #[test]
    fn a_pid_path_outside_a_pod_is_dropped() {
        let s = S.replace(
            r#"{"type": "pid"}"#,
            r#"{"type": "pid", "path": "/proc/42/ns/pid"}"#,
        );
        let g = guest_spec(&spec(&s), "c1", Path::new("/b"), Path::new("/b/rootfs")).unwrap();
        let nss = g
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert!(nss.iter().all(|n| n.path().is_none()), "{nss:?}");
    }

    fn with_bind(source: &str, options: &[&str]) -> Spec {
        spec(&format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs"}},
                "mounts": [{{"destination": "/m", "type": "bind", "source": {source:?}, "options": {options:?}}}]}}"#
        ))
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-tr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/proc", d.join("to-proc")).unwrap();
        std::os::unix::fs::symlink("/sys/kernel", d.join("to-sys")).unwrap();
        std::os::unix::fs::symlink("/dev", d.join("a/to-dev")).unwrap();
        std::os::unix::fs::symlink("../../..", d.join("a/b/up")).unwrap();
        d
    }

    #[test]
    fn sources_that_lead_into_host_kernel_dirs_are_refused() {
        let d = scratch("guard");
        let ds = d.display();
        for src in [
            format!("{ds}/a/../../../proc"),
            "/tmp/../proc/self".to_string(),
            "/dev/../dev/sda".to_string(),
            format!("{ds}/to-proc"),
            format!("{ds}/to-sys/.."),
            format!("{ds}/a/to-dev/null"),
            format!("{ds}/a/b/up/../../proc"),
        ] {
            let r = guest_spec(&with_bind(&src, &["rbind"]), "c", &d, &d.join("rootfs"));
            assert!(
                matches!(r, Err(TranslateError::HostKernelPath { .. })),
                "{src}: {r:?}"
            );
        }
        // Named directly, they are the guest's own: left alone, not shared.
        for src in ["/proc", "/dev/shm", "/sys/fs/cgroup", "/./sys"] {
            let g = guest_spec(&with_bind(src, &["rbind"]), "c", &d, &d.join("rootfs")).unwrap();
            assert_eq!(g.binds.len(), 1, "{src}: only the rootfs is shared");
        }
        // A relative source resolves against the bundle.
        let r = guest_spec(&with_bind("to-proc", &["bind"]), "c", &d, &d.join("rootfs"));
        assert!(r.is_err(), "{r:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn read_only_binds_and_rootfs_are_marked() {
        let g = guest_spec(&spec(S), "c1", Path::new("/b"), Path::new("/b/rootfs")).unwrap();
        let ro: Vec<_> = g.binds.iter().map(|b| b.readonly).collect();
        assert_eq!(ro, [false, false, true, false]);
        assert!(g.binds[0].mount_targets.is_empty());
        let mut s = spec(S);
        s.root_mut().as_mut().unwrap().set_readonly(Some(true));
        let g = guest_spec(&s, "c1", Path::new("/b"), Path::new("/b/rootfs")).unwrap();
        assert!(g.binds[0].readonly);
        let t = &g.binds[0].mount_targets;
        assert!(t.contains(&(PathBuf::from("/etc/hosts"), true)), "{t:?}");
        assert!(t.contains(&(PathBuf::from("/data"), false)), "{t:?}");
        let m = with_bind("/x", &["rbind", "ro", "rw"]);
        let g = guest_spec(&m, "c", Path::new("/b"), Path::new("/b/rootfs")).unwrap();
        assert!(!g.binds[1].readonly, "the last of ro/rw wins");
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn component() -> impl Strategy<Value = &'static str> {
            proptest::sample::select(vec![
                "proc", "sys", "dev", "tmp", "a", "b", "..", ".", "to-proc", "to-sys", "to-dev",
                "up", "x",
            ])
        }

        /// Whatever the spelling (`..`, `.`, symlinks into /proc, /sys,
        /// /dev), no bind the host makes has a source that resolves inside
        /// the host's /dev, /proc or /sys.
        #[test]
        fn no_bind_source_resolves_into_host_kernel_dirs() {
            use proptest::test_runner::{Config, TestRunner};
            let d = scratch("prop");
            let mut runner = TestRunner::new(Config::with_cases(2000));
            let input = (
                proptest::collection::vec(component(), 0..8),
                any::<bool>(),
                any::<bool>(),
            );
            let r = runner.run(&input, |(parts, absolute, from_scratch)| {
                let rel = parts.join("/");
                let src = match (absolute, from_scratch) {
                    (true, true) => format!("{}/{rel}", d.display()),
                    (true, false) => format!("/{rel}"),
                    (false, _) => rel.clone(),
                };
                if src.is_empty() {
                    return Ok(());
                }
                let r = guest_spec(&with_bind(&src, &["rbind"]), "c", &d, &d.join("rootfs"));
                if let Ok(g) = r {
                    for b in &g.binds[1..] {
                        let resolved = std::fs::canonicalize(&b.host_source)
                            .unwrap_or_else(|_| lexical(&b.host_source));
                        prop_assert!(
                            !under_guest_owned(&resolved),
                            "{src} is bound from {}",
                            resolved.display()
                        );
                    }
                }
                Ok(())
            });
            std::fs::remove_dir_all(&d).unwrap();
            r.unwrap();
        }
    }
}
