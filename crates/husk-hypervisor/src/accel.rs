//! Choosing the acceleration: KVM where the host really has hardware
//! virtualization, QEMU's TCG otherwise.
//!
//! `/dev/kvm` alone is not enough: on nested clouds it may be a paravirtual KVM
//! (`kvm_pvm`) that cannot run a stock guest. KVM is chosen only when
//! `/dev/kvm` opens read-write *and* the CPU flags list `vmx` or `svm`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The acceleration a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The configured acceleration: `auto` probes the host, the others force it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// What the acceleration choice reads from the host.
pub trait HostProbe {
    /// Whether `/dev/kvm` can be opened read-write.
    fn kvm_device_usable(&self) -> bool;
    /// The `flags` line(s) of `/proc/cpuinfo`.
    fn cpu_flags(&self) -> String;
}

/// The real host.
pub struct SystemProbe;

impl HostProbe for SystemProbe {
    fn kvm_device_usable(&self) -> bool {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(Path::new("/dev/kvm"))
            .is_ok()
    }

    fn cpu_flags(&self) -> String {
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("flags"))
            .take(1)
            .collect()
    }
}

/// The outcome of [`choose`]: the acceleration and, when it fell back to TCG
/// on its own, a one-line notice saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub notice: Option<String>,
}

/// Picks the acceleration for `mode` on the host `probe` describes.
pub fn choose(mode: AccelMode, probe: &dyn HostProbe) -> AccelChoice {
    match mode {
        AccelMode::Kvm => AccelChoice {
            accel: Accel::Kvm,
            notice: None,
        },
        AccelMode::Tcg => AccelChoice {
            accel: Accel::Tcg,
            notice: None,
        },
        AccelMode::Auto => {
            let flags = probe.cpu_flags();
            let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
            let dev = probe.kvm_device_usable();
            if hw && dev {
                AccelChoice {
                    accel: Accel::Kvm,
                    notice: None,
                }
            } else {
                let why = match (dev, hw) {
                    (false, _) => "/dev/kvm is missing or not usable",
                    (true, false) => {
                        "/dev/kvm exists but the CPU has no vmx/svm (paravirtual KVM cannot boot a stock guest)"
                    }
                    (true, true) => unreachable!("handled above"),
                };
                AccelChoice {
                    accel: Accel::Tcg,
                    notice: Some(format!(
                        "using QEMU TCG (software emulation, slower): {why}; set hypervisor.accel to force one"
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        dev: bool,
        flags: &'static str,
    }
    impl HostProbe for Fake {
        fn kvm_device_usable(&self) -> bool {
            self.dev
        }
        fn cpu_flags(&self) -> String {
            self.flags.to_string()
        }
    }

    #[test]
    fn kvm_needs_device_and_cpu_flags() {
        let c = choose(
            AccelMode::Auto,
            &Fake {
                dev: true,
                flags: "flags : fpu vme vmx sse",
            },
        );
        assert_eq!(c.accel, Accel::Kvm);
        assert!(c.notice.is_none());
    }

    #[test]
    fn paravirtual_kvm_without_vmx_falls_back_to_tcg() {
        let c = choose(
            AccelMode::Auto,
            &Fake {
                dev: true,
                flags: "flags : fpu vme sse hypervisor",
            },
        );
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.notice.unwrap().contains("no vmx/svm"));
    }

    #[test]
    fn no_device_falls_back_to_tcg() {
        let c = choose(
            AccelMode::Auto,
            &Fake {
                dev: false,
                flags: "flags : svm",
            },
        );
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.notice.unwrap().contains("/dev/kvm"));
    }

    #[test]
    fn svm_substring_is_not_a_flag() {
        let c = choose(
            AccelMode::Auto,
            &Fake {
                dev: true,
                flags: "flags : svmx_fake avx512vmxish",
            },
        );
        assert_eq!(c.accel, Accel::Tcg);
    }

    #[test]
    fn forced_modes_are_obeyed() {
        let none = Fake {
            dev: false,
            flags: "",
        };
        assert_eq!(choose(AccelMode::Kvm, &none).accel, Accel::Kvm);
        assert_eq!(choose(AccelMode::Tcg, &none).accel, Accel::Tcg);
    }
}
