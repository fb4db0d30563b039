//! OCI `linux.resources` as cgroup v2 file writes (pure, unit-tested): the
//! conversions runc and crun use for cgroup v2.

use oci_spec::runtime::LinuxResources;

/// Where a value goes: the first file of `files` that exists gets its
/// value. When none exists, a `required` write is an error (the guest
/// kernel lacks the controller) and any other write is skipped with a note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// `(file, value)` alternatives, in order of preference.
    pub files: Vec<(String, String)>,
    /// The OCI field, for messages.
    pub field: &'static str,
    /// Whether a missing file is an error.
    pub required: bool,
}

impl Write {
    fn one(file: &str, value: String, field: &'static str) -> Self {
        Write {
            files: vec![(file.to_string(), value)],
            field,
            required: true,
        }
    }
}

/// A resources object that cannot be applied.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// Swap without a memory limit, or below it.
    #[error("linux.resources.memory: {0}")]
    Swap(&'static str),
    /// A unified key that names no file of this cgroup.
    #[error("linux.resources.unified key {0:?} is not a cgroup file name")]
    BadUnifiedKey(String),
}

/// `cpu.shares` (cgroup v1, 2..262144) to `cpu.weight` (1..10000), as runc
/// and crun convert it: 2 -> 1, 1024 -> 39, 262144 -> 10000.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// `blockIO.weight` (10..1000) to `io.weight` (1..10000), as runc converts it.
pub fn blkio_weight_to_io_weight(weight: u64) -> u64 {
    if weight == 0 {
        return 0;
    }
    let weight = weight.clamp(10, 1000);
    1 + (weight - 10) * 9999 / 990
}

/// `memory.swap` (v1: memory + swap) to `memory.swap.max` (swap alone), as
/// runc converts it; `None` leaves it unset.
pub fn swap_to_v2(swap: i64, memory: Option<i64>) -> Result<Option<String>, ResourceError> {
    let memory = memory.unwrap_or(0);
    if memory == -1 && swap == 0 {
        return Ok(Some("max".to_string()));
    }
    match swap {
        0 => Ok(None),
        s if s < 0 => Ok(Some("max".to_string())),
        _ if memory <= 0 => Err(ResourceError::Swap(
            "a swap limit needs a memory limit; set memory.limit too",
        )),
        s if s < memory => Err(ResourceError::Swap(
            "memory.swap (memory plus swap) must be at least memory.limit",
        )),
        s => Ok(Some((s - memory).to_string())),
    }
}

fn limit(value: i64) -> String {
    if value < 0 {
        "max".to_string()
    } else {
        value.to_string()
    }
}

/// `cpu.max` from quota and period, as runc writes it.
pub fn cpu_max(quota: Option<i64>, period: Option<u64>) -> Option<String> {
    let (quota, period) = (quota.unwrap_or(0), period.unwrap_or(0));
    if quota == 0 && period == 0 {
        return None;
    }
    let mut value = if quota > 0 {
        quota.to_string()
    } else {
        "max".to_string()
    };
    if period != 0 {
        value.push_str(&format!(" {period}"));
    }
    Some(value)
}

/// The writes for `resources`, and notes about fields cgroup v2 (or the
/// guest) has no place for.
pub fn plan(resources: &LinuxResources) -> Result<(Vec<Write>, Vec<String>), ResourceError> {
    let mut writes = Vec::new();
    let mut notes = Vec::new();
    if let Some(memory) = resources.memory() {
        if let Some(value) = memory.limit() {
            writes.push(Write::one("memory.max", limit(value), "memory.limit"));
        }
        if let Some(value) = memory.reservation() {
            writes.push(Write::one("memory.low", limit(value), "memory.reservation"));
        }
        if let Some(swap) = memory.swap() {
            if let Some(value) = swap_to_v2(swap, memory.limit())? {
                writes.push(Write {
                    files: vec![("memory.swap.max".to_string(), value)],
                    field: "memory.swap",
                    required: false,
                });
            }
        }
        if memory.kernel().is_some() || memory.kernel_tcp().is_some() {
            notes.push(
                "memory.kernel and memory.kernelTCP have no cgroup v2 equivalent; ignored"
                    .to_string(),
            );
        }
        if memory.swappiness().is_some() {
            notes.push("memory.swappiness has no cgroup v2 equivalent; ignored".to_string());
        }
        if memory.disable_oom_killer() == Some(true) {
            notes.push("memory.disableOOMKiller has no cgroup v2 equivalent; ignored".to_string());
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            writes.push(Write::one(
                "cpu.weight",
                shares_to_weight(shares).to_string(),
                "cpu.shares",
            ));
        }
        if let Some(value) = cpu_max(cpu.quota(), cpu.period()) {
            writes.push(Write::one("cpu.max", value, "cpu.quota/period"));
        }
        if let Some(burst) = cpu.burst() {
            writes.push(Write::one("cpu.max.burst", burst.to_string(), "cpu.burst"));
        }
        if let Some(idle) = cpu.idle() {
            writes.push(Write::one("cpu.idle", idle.to_string(), "cpu.idle"));
        }
        if let Some(cpus) = cpu.cpus().as_deref().filter(|c| !c.is_empty()) {
            writes.push(Write::one("cpuset.cpus", cpus.to_string(), "cpu.cpus"));
        }
        if let Some(mems) = cpu.mems().as_deref().filter(|m| !m.is_empty()) {
            writes.push(Write::one("cpuset.mems", mems.to_string(), "cpu.mems"));
        }
        if cpu.realtime_runtime().is_some() || cpu.realtime_period().is_some() {
            notes.push(
                "cpu.realtimeRuntime/realtimePeriod have no cgroup v2 equivalent; ignored"
                    .to_string(),
            );
        }
    }
    if let Some(pids) = resources.pids() {
        // runc: 0 and negative limits mean unlimited.
        let value = if pids.limit() > 0 {
            pids.limit().to_string()
        } else {
            "max".to_string()
        };
        writes.push(Write::one("pids.max", value, "pids.limit"));
    }
    if let Some(block_io) = resources.block_io() {
        if let Some(weight) = block_io.weight().filter(|&w| w != 0) {
            writes.push(Write {
                files: vec![
                    ("io.bfq.weight".to_string(), weight.to_string()),
                    (
                        "io.weight".to_string(),
                        format!("default {}", blkio_weight_to_io_weight(weight as u64)),
                    ),
                ],
                field: "blockIO.weight",
                required: false,
            });
        }
        let throttles = [
            ("rbps", block_io.throttle_read_bps_device()),
            ("wbps", block_io.throttle_write_bps_device()),
            ("riops", block_io.throttle_read_iops_device()),
            ("wiops", block_io.throttle_write_iops_device()),
        ];
        for (key, devices) in throttles {
            for device in devices.iter().flatten() {
                writes.push(Write::one(
                    "io.max",
                    format!(
                        "{}:{} {key}={}",
                        device.major(),
                        device.minor(),
                        device.rate()
                    ),
                    "blockIO.throttle*Device",
                ));
            }
        }
        if block_io
            .weight_device()
            .as_ref()
            .is_some_and(|d| !d.is_empty())
        {
            notes.push("blockIO.weightDevice is not applied in the guest; ignored".to_string());
        }
    }
    if resources
        .hugepage_limits()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        notes.push(
            "hugepageLimits: the guest kernel has no hugetlb controller; ignored".to_string(),
        );
    }
    if resources.network().is_some() {
        notes
            .push("network (classID, priorities) has no cgroup v2 equivalent; ignored".to_string());
    }
    if resources.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
        notes.push("rdma: the guest has no RDMA devices; ignored".to_string());
    }
    if let Some(unified) = resources.unified() {
        let mut keys: Vec<(&String, &String)> = unified.iter().collect();
        keys.sort();
        for (key, value) in keys {
            if key.is_empty() || key.contains('/') || key.starts_with('.') || !key.contains('.') {
                return Err(ResourceError::BadUnifiedKey(key.clone()));
            }
            writes.push(Write::one(key, value.clone(), "unified"));
        }
    }
    Ok((writes, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resources(value: serde_json::Value) -> LinuxResources {
        serde_json::from_value(value).unwrap()
    }

    fn files(writes: &[Write]) -> Vec<(String, String)> {
        writes.iter().map(|w| w.files[0].clone()).collect()
    }

    #[test]
    fn shares_to_weight_matches_runc() {
        assert_eq!(shares_to_weight(0), 0);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(1_000_000), 10_000);
    }

    #[test]
    fn blkio_weight_conversion() {
        assert_eq!(blkio_weight_to_io_weight(10), 1);
        assert_eq!(blkio_weight_to_io_weight(500), 4950);
        assert_eq!(blkio_weight_to_io_weight(1000), 10_000);
    }

    #[test]
    fn swap_conversion() {
        assert_eq!(swap_to_v2(0, Some(100)), Ok(None));
        assert_eq!(swap_to_v2(-1, Some(100)), Ok(Some("max".into())));
        assert_eq!(swap_to_v2(0, Some(-1)), Ok(Some("max".into())));
        assert_eq!(swap_to_v2(300, Some(100)), Ok(Some("200".into())));
        assert_eq!(swap_to_v2(100, Some(100)), Ok(Some("0".into())));
        assert!(swap_to_v2(50, Some(100)).is_err());
        assert!(swap_to_v2(50, None).is_err());
    }

    #[test]
    fn cpu_max_values() {
        assert_eq!(cpu_max(None, None), None);
        assert_eq!(
            cpu_max(Some(50_000), Some(100_000)).as_deref(),
            Some("50000 100000")
        );
        assert_eq!(
            cpu_max(Some(-1), Some(100_000)).as_deref(),
            Some("max 100000")
        );
        assert_eq!(cpu_max(Some(20_000), None).as_deref(), Some("20000"));
    }

    #[test]
    fn a_full_plan() {
        let (writes, notes) = plan(&resources(json!({
            "memory": {"limit": 33554432, "reservation": 16777216, "swap": 67108864, "swappiness": 10},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
            "pids": {"limit": 20},
            "blockIO": {"weight": 500, "throttleReadBpsDevice": [{"major": 254, "minor": 0, "rate": 1048576}]},
            "unified": {"memory.high": "50000000"},
            "devices": [{"allow": false, "access": "rwm"}]
        })))
        .unwrap();
        let got = files(&writes);
        let expect = |file: &str, value: &str| {
            assert!(
                got.contains(&(file.to_string(), value.to_string())),
                "{file}={value} missing from {got:?}"
            )
        };
        expect("memory.max", "33554432");
        expect("memory.low", "16777216");
        expect("memory.swap.max", "33554432");
        expect("cpu.weight", "39");
        expect("cpu.max", "50000 100000");
        expect("cpuset.cpus", "0");
        expect("cpuset.mems", "0");
        expect("pids.max", "20");
        expect("io.bfq.weight", "500");
        expect("io.max", "254:0 rbps=1048576");
        expect("memory.high", "50000000");
        let io = writes.iter().find(|w| w.field == "blockIO.weight").unwrap();
        assert_eq!(
            io.files[1],
            ("io.weight".to_string(), "default 4950".to_string())
        );
        assert!(!io.required);
        assert!(notes.iter().any(|n| n.contains("swappiness")), "{notes:?}");
    }

    #[test]
    fn unlimited_values() {
        let (writes, _) = plan(&resources(json!({
            "memory": {"limit": -1},
            "pids": {"limit": -1}
        })))
        .unwrap();
        assert_eq!(
            files(&writes),
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("pids.max".to_string(), "max".to_string())
            ]
        );
        let (writes, _) = plan(&resources(json!({"pids": {"limit": 0}}))).unwrap();
        assert_eq!(
            files(&writes),
            vec![("pids.max".to_string(), "max".to_string())]
        );
    }

    #[test]
    fn bad_unified_keys() {
        for key in ["../x", "cgroup", ""] {
            let mut map = serde_json::Map::new();
            map.insert(key.to_string(), json!("1"));
            assert!(plan(&resources(json!({"unified": map}))).is_err(), "{key}");
        }
    }
}
