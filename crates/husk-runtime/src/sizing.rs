//! How big a sandbox's VM is, and where it runs, derived from the spec of the
//! container that owns it (the CLI's one container, a pod's sandbox
//! container).
//!
//! - Memory: the configured `hypervisor.memory_mib` (what the guest kernel
//!   and agent need) plus `linux.resources.memory.limit`, so the container
//!   can use all it was given and the limit, applied in the guest, is what
//!   stops it; never more than the host's RAM (a larger limit means no limit
//!   the host could honour).
//! - vCPUs: the configured `hypervisor.vcpus` plus ⌈quota / period⌉ of
//!   `linux.resources.cpu`, never more than the host CPUs husk may use.
//! - Host CPUs: `linux.resources.cpu.cpus` names host CPUs. The guest's CPUs
//!   are vCPUs, so the list is not applied in the guest: QEMU (every vCPU
//!   thread) is pinned to those host CPUs instead, and the VM gets no more
//!   vCPUs than the list has CPUs. `cpu.mems` (host NUMA nodes) is dropped.
//!
//! For a pod booted by the shim (the CRI path), the CRI sandbox
//! annotations (`io.kubernetes.cri.sandbox-*`) take the place of the
//! owner's own memory and CPU limits ([`Annotations::Honoured`]). Anywhere
//! else they are ignored: an annotation is not a limit a CLI user's spec
//! has to pass. Whatever the source, the VM is never bigger than
//! `[limits]` in the configuration allows.

use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::pod::{annotation, SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY};

/// The spec asks for a placement the host cannot give.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error(
        "linux.resources.cpu.cpus {0:?} is not a CPU list: use numbers and ranges like \"0-2,4\""
    )]
    BadCpuList(String),
    #[error("linux.resources.cpu.cpus {list:?} names host CPUs husk may not use (allowed: {allowed}); pick CPUs from that list")]
    CpusNotAllowed { list: String, allowed: String },
}

/// Parses a cpuset list (`0-2,4`); sorted, without duplicates.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, SizingError> {
    let bad = || SizingError::BadCpuList(list.to_string());
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let first: usize = first.parse().map_err(|_| bad())?;
        let last: usize = last.parse().map_err(|_| bad())?;
        if first > last || last >= 4096 {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// `[0, 1, 2, 5]` as `0-2,5`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    out.join(",")
}

/// What the host offers a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The CPUs husk may run on (its affinity mask).
    pub cpus: Vec<usize>,
    /// Its RAM (`MemTotal`).
    pub memory_mib: u64,
}

impl Host {
    /// This host, as seen by this process.
    pub fn probe() -> Host {
        let cpus = match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
            Ok(set) => (0..nix::sched::CpuSet::count())
                .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
                .collect(),
            Err(_) => {
                let n = std::thread::available_parallelism().map_or(1, |n| n.get());
                (0..n).collect()
            }
        };
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(u64::MAX, |kib| kib / 1024);
        Host { cpus, memory_mib }
    }
}

/// Whether the CRI sandbox annotations size the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Annotations {
    /// The shim's pods: containerd's CRI plugin sets them for the pod.
    Honoured,
    /// The CLI: only the spec's own limits count.
    Ignored,
}

/// The VM for the container whose spec is `spec`, on `host`.
pub fn vm_config(
    cfg: &Config,
    spec: &Spec,
    host: &Host,
    annotations: Annotations,
) -> Result<Config, SizingError> {
    let allowed = &host.cpus[..];
    let mut out = cfg.clone();
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    let cri = |key: &str| match annotations {
        Annotations::Honoured => annotation(spec, key),
        Annotations::Ignored => None,
    };
    let memory_limit = cri(SANDBOX_MEMORY)
        .and_then(|v| v.parse::<i64>().ok())
        .or_else(|| {
            resources
                .as_ref()
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
        })
        .filter(|l| *l > 0);
    if let Some(bytes) = memory_limit {
        let wanted = u64::from(cfg.hypervisor.memory_mib) + (bytes as u64).div_ceil(1 << 20);
        let mut most = host.memory_mib;
        if cfg.limits.max_memory_mib > 0 {
            most = most.min(u64::from(cfg.limits.max_memory_mib));
        }
        let most = most.max(u64::from(cfg.hypervisor.memory_mib));
        if wanted > most {
            tracing::info!(
                wanted_mib = wanted,
                host_mib = host.memory_mib,
                "the memory limit is more than the host has: the VM gets the host's RAM"
            );
        }
        out.hypervisor.memory_mib = u32::try_from(wanted.min(most)).unwrap_or(u32::MAX);
    }

    let cpu = resources.as_ref().and_then(|r| r.cpu().clone());
    let pinned = match cpu.as_ref().and_then(|c| c.cpus().clone()) {
        Some(list) if !list.trim().is_empty() => {
            let cpus = parse_cpu_list(&list)?;
            if !cpus.iter().all(|c| allowed.contains(c)) {
                return Err(SizingError::CpusNotAllowed {
                    list,
                    allowed: format_cpu_list(allowed),
                });
            }
            Some(cpus)
        }
        _ => None,
    };
    let mut usable = pinned.as_ref().map_or(allowed.len(), Vec::len).max(1) as u64;
    if cfg.limits.max_vcpus > 0 {
        usable = usable.min(u64::from(cfg.limits.max_vcpus));
    }

    let quota = cri(SANDBOX_CPU_QUOTA)
        .and_then(|v| v.parse::<i64>().ok())
        .or_else(|| cpu.as_ref().and_then(|c| c.quota()));
    let period = cri(SANDBOX_CPU_PERIOD)
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| cpu.as_ref().and_then(|c| c.period()));
    let mut vcpus = u64::from(cfg.hypervisor.vcpus);
    if let (Some(q), Some(p)) = (quota, period) {
        if q > 0 && p > 0 {
            vcpus += (q as u64).div_ceil(p);
            // Never more than the host can run, nor fewer than configured.
            vcpus = vcpus.min(usable).max(u64::from(cfg.hypervisor.vcpus));
        }
    }
    if pinned.is_some() {
        vcpus = vcpus.min(usable);
    }
    out.hypervisor.vcpus = vcpus as u32;
    out.hypervisor.host_cpus = pinned;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A spec with these annotations and `linux.resources`.
    pub(crate) fn spec(annotations: serde_json::Value, resources: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": annotations,
            "linux": {"resources": resources}
        }))
        .unwrap()
    }

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(parse_cpu_list("0-2,4").unwrap(), vec![0, 1, 2, 4]);
        assert_eq!(parse_cpu_list(" 3 , 1,1").unwrap(), vec![1, 3]);
        assert_eq!(format_cpu_list(&[0, 1, 2, 4, 6, 7]), "0-2,4,6-7");
        for bad in ["", "a", "2-1", "1-", "0-99999", "1,,2"] {
            assert_eq!(
                parse_cpu_list(bad),
                Err(SizingError::BadCpuList(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    fn host(cpus: usize) -> Host {
        Host {
            cpus: (0..cpus).collect(),
            memory_mib: 16 * 1024,
        }
    }

    #[test]
    fn limits_size_the_vm() {
        let cfg = Config::default();
        let eight = host(8);
        let plain = spec(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(
            vm_config(&cfg, &plain, &eight, Annotations::Honoured).unwrap(),
            cfg
        );

        let own = spec(
            serde_json::json!({}),
            serde_json::json!({"memory": {"limit": 33554432}, "cpu": {"quota": 150000, "period": 100000}}),
        );
        let c = vm_config(&cfg, &own, &eight, Annotations::Honoured).unwrap();
        assert_eq!(c.hypervisor.memory_mib, cfg.hypervisor.memory_mib + 32);
        assert_eq!(c.hypervisor.vcpus, cfg.hypervisor.vcpus + 2);
        // Never more vCPUs than the host has.
        assert_eq!(
            vm_config(&cfg, &own, &host(2), Annotations::Honoured)
                .unwrap()
                .hypervisor
                .vcpus,
            2
        );

        // The pod's annotations win over the sandbox container's own limits.
        let pod = spec(
            serde_json::json!({SANDBOX_MEMORY: "1048577", SANDBOX_CPU_QUOTA: "0", SANDBOX_CPU_PERIOD: "100000"}),
            serde_json::json!({"memory": {"limit": 33554432}}),
        );
        let c = vm_config(&cfg, &pod, &eight, Annotations::Honoured).unwrap();
        assert_eq!(c.hypervisor.memory_mib, cfg.hypervisor.memory_mib + 2);
        assert_eq!(c.hypervisor.vcpus, cfg.hypervisor.vcpus);

        // A limit beyond the host's RAM: the host's RAM.
        let huge = spec(
            serde_json::json!({}),
            serde_json::json!({"memory": {"limit": 1i64 << 40}}),
        );
        let c = vm_config(&cfg, &huge, &eight, Annotations::Honoured).unwrap();
        assert_eq!(c.hypervisor.memory_mib, 16 * 1024);
    }

    #[test]
    fn annotations_size_only_the_shims_pods_and_limits_cap_everything() {
        let cfg = Config::default();
        let eight = host(8);
        let asks = spec(
            serde_json::json!({SANDBOX_MEMORY: "8589934592", SANDBOX_CPU_QUOTA: "800000", SANDBOX_CPU_PERIOD: "100000"}),
            serde_json::json!({"memory": {"limit": 33554432}}),
        );
        // The CLI: the annotations are not limits; the spec's own are.
        let cli = vm_config(&cfg, &asks, &eight, Annotations::Ignored).unwrap();
        assert_eq!(cli.hypervisor.memory_mib, cfg.hypervisor.memory_mib + 32);
        assert_eq!(cli.hypervisor.vcpus, cfg.hypervisor.vcpus);
        // The shim's pod: they are, up to the host.
        let pod = vm_config(&cfg, &asks, &eight, Annotations::Honoured).unwrap();
        assert_eq!(pod.hypervisor.memory_mib, cfg.hypervisor.memory_mib + 8192);
        assert_eq!(pod.hypervisor.vcpus, 8);
        // And the configuration caps both.
        let mut capped = cfg.clone();
        capped.limits.max_memory_mib = 1024;
        capped.limits.max_vcpus = 2;
        let c = vm_config(&capped, &asks, &eight, Annotations::Honoured).unwrap();
        assert_eq!(c.hypervisor.memory_mib, 1024);
        assert_eq!(c.hypervisor.vcpus, 2);
    }

    #[test]
    fn a_cpuset_pins_the_vm_and_bounds_its_vcpus() {
        let cfg = Config::default();
        let four = host(4);
        let pinned = spec(
            serde_json::json!({}),
            serde_json::json!({"cpu": {"cpus": "1-2", "quota": 400000, "period": 100000}}),
        );
        let c = vm_config(&cfg, &pinned, &four, Annotations::Honoured).unwrap();
        assert_eq!(c.hypervisor.host_cpus, Some(vec![1, 2]));
        assert_eq!(c.hypervisor.vcpus, 2);

        let outside = spec(
            serde_json::json!({}),
            serde_json::json!({"cpu": {"cpus": "3,7"}}),
        );
        assert_eq!(
            vm_config(&cfg, &outside, &four, Annotations::Honoured),
            Err(SizingError::CpusNotAllowed {
                list: "3,7".into(),
                allowed: "0-3".into()
            })
        );
        let garbage = spec(
            serde_json::json!({}),
            serde_json::json!({"cpu": {"cpus": "x"}}),
        );
        assert!(matches!(
            vm_config(&cfg, &garbage, &four, Annotations::Honoured),
            Err(SizingError::BadCpuList(_))
        ));
    }

    #[test]
    fn this_host_has_cpus_and_memory() {
        let h = Host::probe();
        assert!(!h.cpus.is_empty());
        assert!(h.memory_mib > 64 && h.memory_mib < u64::MAX, "{h:?}");
    }
}
