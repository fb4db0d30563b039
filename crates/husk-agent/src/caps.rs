//! Linux capabilities of a container process: the OCI names, the five sets
//! as bit masks (pure, unit-tested), and applying them (in the init and exec
//! stages) in runc's order: bounding set first, then keep the permitted set
//! across the uid change, then `capset`, then the ambient set.

use oci_spec::runtime::{Capabilities, LinuxCapabilities};
use serde::{Deserialize, Serialize};

/// Capability names by number (`include/uapi/linux/capability.h`); the
/// list lives in the protocol so `husk features` reports the same set.
pub use husk_protocol::CAPABILITIES as NAMES;

/// The number of a capability name (`CAP_CHOWN` or `chown`, any case).
pub fn number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    NAMES.iter().position(|n| *n == full).map(|n| n as u32)
}

/// The five sets of a process, as bit masks (bit n is capability n).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    /// Bounding set: everything else is dropped from it.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
}

fn mask(set: Option<&Capabilities>, notes: &mut Vec<String>) -> u64 {
    let mut bits = 0u64;
    for cap in set.into_iter().flatten() {
        // oci-spec serialises each capability as its OCI name.
        let name = serde_json::to_value(cap)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{cap:?}"));
        match number(&name) {
            Some(n) => bits |= 1 << n,
            None => notes.push(format!("unknown capability {name} ignored")),
        }
    }
    bits
}

impl CapSets {
    /// The sets of an OCI `process.capabilities`, and notes about names
    /// that were skipped.
    pub fn from_spec(caps: &LinuxCapabilities) -> (Self, Vec<String>) {
        let mut notes = Vec::new();
        let sets = CapSets {
            bounding: mask(caps.bounding().as_ref(), &mut notes),
            effective: mask(caps.effective().as_ref(), &mut notes),
            permitted: mask(caps.permitted().as_ref(), &mut notes),
            inheritable: mask(caps.inheritable().as_ref(), &mut notes),
            ambient: mask(caps.ambient().as_ref(), &mut notes),
        };
        (sets, notes)
    }

    /// The sets limited to the capabilities the kernel knows (`0..=last`),
    /// with the ambient set limited to what may be raised (permitted and
    /// inheritable), as the kernel requires.
    pub fn for_kernel(self, last: u32) -> Self {
        let known = if last >= 63 {
            u64::MAX
        } else {
            (1u64 << (last + 1)) - 1
        };
        CapSets {
            bounding: self.bounding & known,
            effective: self.effective & known,
            permitted: self.permitted & known,
            inheritable: self.inheritable & known,
            ambient: self.ambient & known & self.permitted & self.inheritable,
        }
    }

    /// Capabilities to drop from the bounding set: every known one that
    /// is not in it.
    pub fn bounding_drops(&self, last: u32) -> Vec<u32> {
        (0..=last.min(63))
            .filter(|&cap| self.bounding & (1 << cap) == 0)
            .collect()
    }

    /// Names of the capabilities in `mask`, for messages.
    pub fn names(mask: u64) -> Vec<&'static str> {
        NAMES
            .iter()
            .enumerate()
            .filter(|(n, _)| mask & (1 << n) != 0)
            .map(|(_, name)| *name)
            .collect()
    }
}

/// The highest capability the running kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(NAMES.len(), 41);
        assert_eq!(number("CAP_CHOWN"), Some(0));
        assert_eq!(number("cap_kill"), Some(5));
        assert_eq!(number("SYS_ADMIN"), Some(21));
        assert_eq!(number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(number("CAP_NOPE"), None);
    }

    #[test]
    fn sets_from_a_spec() {
        let caps: LinuxCapabilities = serde_json::from_value(serde_json::json!({
            "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "inheritable": ["CAP_NET_BIND_SERVICE"],
            "ambient": ["CAP_NET_BIND_SERVICE", "CAP_CHOWN"]
        }))
        .unwrap();
        let (sets, notes) = CapSets::from_spec(&caps);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(sets.bounding, 1 | 1 << 5 | 1 << 10);
        assert_eq!(sets.effective, 1 << 5);
        assert_eq!(sets.permitted, 1 << 5 | 1 << 10);
        // CAP_CHOWN is not permitted and inheritable, so it cannot be ambient.
        let kernel = sets.for_kernel(40);
        assert_eq!(kernel.ambient, 1 << 10);
        assert_eq!(CapSets::names(kernel.ambient), vec!["CAP_NET_BIND_SERVICE"]);
        let drops = kernel.bounding_drops(40);
        assert_eq!(drops.len(), 41 - 3);
        assert!(!drops.contains(&0) && !drops.contains(&5) && drops.contains(&21));
    }

    #[test]
    fn capabilities_beyond_the_kernel_are_left_out() {
        let sets = CapSets {
            bounding: 1 << 40 | 1,
            effective: 1 << 40,
            permitted: 1 << 40,
            inheritable: 0,
            ambient: 0,
        };
        let kernel = sets.for_kernel(37);
        assert_eq!(kernel.bounding, 1);
        assert_eq!(kernel.effective, 0);
        assert_eq!(sets.bounding_drops(37).len(), 37);
    }
}
