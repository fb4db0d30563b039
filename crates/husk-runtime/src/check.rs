//! `husk check`: can this host run sandboxes, and if not, what is missing
//! and how to get it.

use std::path::Path;
use std::process::Command;

use husk_hypervisor::accel::{self, AccelMode, HostProbe};

use crate::config::{Config, SharedFsKind};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub item: &'static str,
    pub ok: bool,
    /// What was found, or what is wrong and how to fix it.
    pub detail: String,
}

fn first_line_of(cmd: &Path, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

/// Checks everything a sandbox needs; `is_root` and `probe` are passed in so
/// the logic is testable.
pub fn run_checks(cfg: &Config, is_root: bool, probe: &dyn HostProbe) -> Vec<Finding> {
    let mut f = Vec::new();
    f.push(Finding {
        item: "privileges",
        ok: is_root,
        detail: if is_root {
            "running as root".into()
        } else {
            "husk needs root (mount namespaces, bind mounts): run it as root".into()
        },
    });
    let qemu = &cfg.hypervisor.path;
    f.push(match qemu.is_file() {
        true => Finding {
            item: "qemu",
            ok: true,
            detail: format!(
                "{} ({})",
                qemu.display(),
                first_line_of(qemu, "--version").unwrap_or_else(|| "version unknown".into())
            ),
        },
        false => Finding {
            item: "qemu",
            ok: false,
            detail: format!(
                "{} not found: install qemu-system-x86 (make setup) or set hypervisor.path",
                qemu.display()
            ),
        },
    });
    for (item, path, key) in [
        ("kernel", &cfg.hypervisor.kernel, "hypervisor.kernel"),
        ("initrd", &cfg.hypervisor.initrd, "hypervisor.initrd"),
    ] {
        f.push(if path.is_file() {
            Finding {
                item,
                ok: true,
                detail: path.display().to_string(),
            }
        } else {
            Finding {
                item,
                ok: false,
                detail: format!(
                    "{} not found: run `make guest && make install`, or set {key}",
                    path.display()
                ),
            }
        });
    }
    let choice = accel::choose(cfg.hypervisor.accel, probe);
    let kvm_forced_but_missing =
        cfg.hypervisor.accel == AccelMode::Kvm && !probe.kvm_device_usable();
    f.push(Finding {
        item: "acceleration",
        ok: !kvm_forced_but_missing,
        detail: if kvm_forced_but_missing {
            "hypervisor.accel = \"kvm\" but /dev/kvm is not usable: set it to \"auto\" or \"tcg\""
                .into()
        } else {
            match choice.notice {
                Some(n) => n,
                None => format!("{}", choice.accel),
            }
        },
    });
    let vfsd = cfg.find_virtiofsd();
    f.push(match (cfg.shared_fs.kind, vfsd) {
        (SharedFsKind::NineP, _) => Finding {
            item: "shared fs",
            ok: true,
            detail: "9p (forced by shared_fs.kind)".into(),
        },
        (_, Some(p)) => Finding {
            item: "shared fs",
            ok: true,
            detail: format!("virtio-fs via {}", p.display()),
        },
        (SharedFsKind::Virtiofs | SharedFsKind::Auto, None) => Finding {
            item: "shared fs",
            ok: false,
            detail: "virtiofsd not found: `cargo install virtiofsd` (make setup), set shared_fs.virtiofsd, or use shared_fs.kind = \"9p\" (9p is never chosen silently)".into(),
        },
    });
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoKvm;
    impl HostProbe for NoKvm {
        fn kvm_device_usable(&self) -> bool {
            false
        }
        fn cpu_flags(&self) -> String {
            "flags : sse".into()
        }
    }

    #[test]
    fn missing_parts_are_named_with_a_fix() {
        let mut cfg = Config::default();
        cfg.hypervisor.path = "/nonexistent/qemu".into();
        cfg.hypervisor.kernel = "/nonexistent/vmlinux".into();
        cfg.hypervisor.initrd = "/nonexistent/initrd.img".into();
        cfg.hypervisor.accel = AccelMode::Kvm;
        cfg.shared_fs.kind = SharedFsKind::NineP;
        let f = run_checks(&cfg, false, &NoKvm);
        let bad: Vec<_> = f.iter().filter(|x| !x.ok).map(|x| x.item).collect();
        assert_eq!(
            bad,
            vec!["privileges", "qemu", "kernel", "initrd", "acceleration"]
        );
        let k = f.iter().find(|x| x.item == "kernel").unwrap();
        assert!(k.detail.contains("make guest"), "{}", k.detail);
    }

    #[test]
    fn tcg_fallback_is_fine_but_explained() {
        let cfg = Config::default();
        let f = run_checks(&cfg, true, &NoKvm);
        let a = f.iter().find(|x| x.item == "acceleration").unwrap();
        assert!(a.ok);
        assert!(a.detail.contains("TCG"), "{}", a.detail);
    }
}
