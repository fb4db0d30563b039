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
    /// The host's TSC frequency in kHz, when the host kernel knows it
    /// exactly (`tsc_known_freq`); see [`tcg_clock_params`].
    fn tsc_khz(&self) -> Option<u64> {
        None
    }
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

    fn tsc_khz(&self) -> Option<u64> {
        tsc_khz_from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
    }
}

/// The TSC frequency from `/proc/cpuinfo` text: `cpu MHz` of the first CPU,
/// trusted only with the `tsc_known_freq` and `constant_tsc` flags.
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if !(has("tsc_known_freq") && has("constant_tsc")) {
        return None;
    }
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    let khz = (mhz * 1000.0).round() as u64;
    (khz > 0).then_some(khz)
}

/// Guest kernel parameters for a TCG guest; empty for KVM.
///
/// - Under TCG the guest's TSC is the host's, but the guest cannot
///   calibrate it and falls back to a 10 ms jiffies clock; telling it the
///   frequency (when the host knows it exactly) gives it the `tsc`
///   clocksource: accurate sleeps, about 0.1 s faster boot.
/// - `noapictimer`: calibrating the local APIC timer against the PIT takes
///   about 0.2 s of emulated time at every boot; the guest ticks from the
///   PIT instead (sleeps stay accurate, measured).
pub fn tcg_clock_params(accel: Accel, tsc_khz: Option<u64>) -> Vec<String> {
    if accel != Accel::Tcg {
        return Vec::new();
    }
    let mut p = vec!["noapictimer".to_string()];
    if let Some(khz) = tsc_khz {
        p.extend([format!("tsc_early_khz={khz}"), "tsc=reliable".into()]);
    }
    p
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
    fn tsc_frequency_needs_known_freq() {
        let good = "cpu MHz\t\t: 2599.998\nflags\t\t: fpu constant_tsc tsc_known_freq\n";
        assert_eq!(tsc_khz_from_cpuinfo(good), Some(2_599_998));
        let unknown = "cpu MHz\t\t: 2599.998\nflags\t\t: fpu constant_tsc\n";
        assert_eq!(tsc_khz_from_cpuinfo(unknown), None);
        assert_eq!(
            tcg_clock_params(Accel::Tcg, Some(2_599_998)),
            vec![
                "noapictimer".to_string(),
                "tsc_early_khz=2599998".to_string(),
                "tsc=reliable".to_string()
            ]
        );
        assert!(tcg_clock_params(Accel::Kvm, Some(2_599_998)).is_empty());
        assert_eq!(
            tcg_clock_params(Accel::Tcg, None),
            vec!["noapictimer".to_string()]
        );
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
