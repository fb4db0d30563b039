//! The guest's cgroup v2 statistics (agent `StatsContainer`, as the runtime's typed [`Stats`]) as
//! containerd's cgroup v2 metrics (`io.containerd.cgroups.v2.Metrics`, what
//! `ctr task metrics` and the CRI decode). Converted exactly once, here.

use std::collections::BTreeMap;

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageFull};
use husk_runtime::agent::Stats;

fn stat(m: &BTreeMap<String, u64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0)
}

/// A `memory.stat` key, or the sum of its `_anon`/`_file` halves (newer
/// kernels split some counters).
fn stat_or_halves(m: &BTreeMap<String, u64>, key: &str) -> u64 {
    m.get(key)
        .copied()
        .unwrap_or_else(|| stat(m, &format!("{key}_anon")) + stat(m, &format!("{key}_file")))
}

pub fn to_metrics(s: &Stats) -> Metrics {
    let m = &s.memory_stat;
    let memory = MemoryStat {
        anon: stat(m, "anon"),
        file: stat(m, "file"),
        kernel_stack: stat(m, "kernel_stack"),
        slab: stat(m, "slab"),
        sock: stat(m, "sock"),
        shmem: stat(m, "shmem"),
        file_mapped: stat(m, "file_mapped"),
        file_dirty: stat(m, "file_dirty"),
        file_writeback: stat(m, "file_writeback"),
        anon_thp: stat(m, "anon_thp"),
        inactive_anon: stat(m, "inactive_anon"),
        active_anon: stat(m, "active_anon"),
        inactive_file: stat(m, "inactive_file"),
        active_file: stat(m, "active_file"),
        unevictable: stat(m, "unevictable"),
        slab_reclaimable: stat(m, "slab_reclaimable"),
        slab_unreclaimable: stat(m, "slab_unreclaimable"),
        pgfault: stat(m, "pgfault"),
        pgmajfault: stat(m, "pgmajfault"),
        workingset_refault: stat_or_halves(m, "workingset_refault"),
        workingset_activate: stat_or_halves(m, "workingset_activate"),
        workingset_nodereclaim: stat(m, "workingset_nodereclaim"),
        pgrefill: stat(m, "pgrefill"),
        pgscan: stat(m, "pgscan"),
        pgsteal: stat(m, "pgsteal"),
        pgactivate: stat(m, "pgactivate"),
        pgdeactivate: stat(m, "pgdeactivate"),
        pglazyfree: stat(m, "pglazyfree"),
        pglazyfreed: stat(m, "pglazyfreed"),
        thp_fault_alloc: stat(m, "thp_fault_alloc"),
        thp_collapse_alloc: stat(m, "thp_collapse_alloc"),
        usage: s.memory_usage,
        // The agent says 0 for "max"; containerd's cgroup v2 code says u64::MAX.
        usage_limit: if s.memory_limit == 0 {
            u64::MAX
        } else {
            s.memory_limit
        },
        swap_usage: s.memory_swap_usage,
        max_usage: s.memory_peak,
        ..Default::default()
    };
    Metrics {
        pids: Some(PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(memory).into(),
        memory_events: Some(MemoryEvents {
            oom_kill: s.memory_oom_kills,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// The metrics packed as containerd expects them in `StatsResponse`.
pub fn to_any(s: &Stats) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let metrics = to_metrics(s);
    Ok(Any {
        type_url: Metrics::descriptor().full_name().to_string(),
        value: metrics.write_to_bytes()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_become_cgroup_v2_metrics() {
        let mut s = Stats {
            cpu_usage_usec: 10,
            cpu_user_usec: 6,
            cpu_system_usec: 4,
            memory_usage: 1 << 20,
            memory_limit: 0,
            memory_oom_kills: 2,
            pids_current: 3,
            pids_limit: 100,
            ..Default::default()
        };
        s.memory_stat.insert("anon".into(), 4096);
        s.memory_stat.insert("workingset_refault_anon".into(), 1);
        s.memory_stat.insert("workingset_refault_file".into(), 2);
        let any = to_any(&s).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 10);
        assert_eq!(m.cpu.user_usec, 6);
        assert_eq!(m.memory.usage, 1 << 20);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.anon, 4096);
        assert_eq!(m.memory.workingset_refault, 3);
        assert_eq!(m.memory_events.oom_kill, 2);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 100);
    }
}
