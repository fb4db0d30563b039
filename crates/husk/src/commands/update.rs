use anyhow::Context;
use husk_runtime::monitor::api::Request;
use husk_runtime::status::Verb;
use serde_json::{json, Map, Value};

use crate::cli::{GlobalOpts, UpdateArgs};

/// Parses `1024`, `64k`, `64m`, `1g` (binary units, as runc).
pub fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1i64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        Some('t') => (&lower[..lower.len() - 1], 1 << 40),
        _ => (lower, 1),
    };
    if num == "-1" {
        return Ok(-1);
    }
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid size {s:?}: use bytes or a k/m/g suffix"))?;
    Ok((n * mult as f64) as i64)
}

/// The OCI `linux.resources` object the flags describe.
pub fn resources_from_flags(a: &UpdateArgs) -> anyhow::Result<Value> {
    let mut memory = Map::new();
    if let Some(m) = &a.memory {
        memory.insert("limit".into(), json!(parse_bytes(m)?));
    }
    if let Some(m) = &a.memory_swap {
        memory.insert("swap".into(), json!(parse_bytes(m)?));
    }
    if let Some(m) = &a.memory_reservation {
        memory.insert("reservation".into(), json!(parse_bytes(m)?));
    }
    let mut cpu = Map::new();
    if let Some(v) = a.cpu_shares {
        cpu.insert("shares".into(), json!(v));
    }
    if let Some(v) = a.cpu_period {
        cpu.insert("period".into(), json!(v));
    }
    if let Some(v) = a.cpu_quota {
        cpu.insert("quota".into(), json!(v));
    }
    if let Some(c) = a.cpus {
        if c <= 0.0 {
            anyhow::bail!("--cpus must be positive");
        }
        let period = a.cpu_period.unwrap_or(100_000);
        cpu.insert("period".into(), json!(period));
        cpu.insert("quota".into(), json!((c * period as f64).round() as i64));
    }
    if let Some(v) = &a.cpuset_cpus {
        cpu.insert("cpus".into(), json!(v));
    }
    if let Some(v) = &a.cpuset_mems {
        cpu.insert("mems".into(), json!(v));
    }
    let mut r = Map::new();
    if !memory.is_empty() {
        r.insert("memory".into(), Value::Object(memory));
    }
    if !cpu.is_empty() {
        r.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(p) = a.pids_limit {
        r.insert("pids".into(), json!({"limit": p}));
    }
    if let Some(w) = a.blkio_weight {
        r.insert("blockIO".into(), json!({"weight": w}));
    }
    Ok(Value::Object(r))
}

pub fn update(g: &GlobalOpts, a: UpdateArgs) -> anyhow::Result<u8> {
    let resources = match &a.resources {
        Some(p) => {
            let text = if p.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?
            };
            let r: oci_spec::runtime::LinuxResources = serde_json::from_str(&text)
                .with_context(|| format!("invalid resources JSON in {}", p.display()))?;
            serde_json::to_value(r)?
        }
        None => resources_from_flags(&a)?,
    };
    if resources.as_object().is_none_or(|o| o.is_empty()) {
        anyhow::bail!(
            "nothing to update: give --memory, --cpus, --pids-limit, ... or --resources FILE"
        );
    }
    let t = super::Target::open(g, &a.id)?;
    t.require(Verb::Update)?;
    let resources: oci_spec::runtime::LinuxResources =
        serde_json::from_value(resources).map_err(|e| anyhow::anyhow!("invalid resources: {e}"))?;
    t.ask(&Request::Update {
        resources: Box::new(resources),
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        assert!(parse_bytes("lots").is_err());
    }
}
