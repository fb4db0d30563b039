use std::time::Duration;

use anyhow::Context;
use husk_runtime::monitor::api::Request;
use husk_runtime::state::Status;
use serde_json::{json, Value};

use crate::cli::{EventsArgs, GlobalOpts};

/// Parses `5s`, `500ms`, `1m` or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?}: use e.g. 5s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => anyhow::bail!("invalid duration {s:?}: use e.g. 5s or 500ms"),
    };
    if secs <= 0.0 {
        anyhow::bail!("invalid duration {s:?}: it must be positive");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// runc's `stats` event data from the monitor's cgroup v2 numbers.
pub fn runc_stats(s: &Value) -> Value {
    let u = |k: &str| s[k].as_u64().unwrap_or(0);
    json!({
        "cpu": {
            "usage": {
                "total": u("cpu_usage_usec") * 1000,
                "kernel": u("cpu_system_usec") * 1000,
                "user": u("cpu_user_usec") * 1000,
            },
            "throttling": {
                "periods": u("cpu_nr_periods"),
                "throttledPeriods": u("cpu_nr_throttled"),
                "throttledTime": u("cpu_throttled_usec") * 1000,
            }
        },
        "memory": {
            "usage": {"limit": u("memory_limit"), "usage": u("memory_usage"), "max": u("memory_peak"), "failcnt": u("memory_oom_kills")},
            "swap": {"usage": u("memory_swap_usage")},
            "raw": s["memory_stat"],
        },
        "pids": {"current": u("pids_current"), "limit": u("pids_limit")},
    })
}

pub fn events(g: &GlobalOpts, a: EventsArgs) -> anyhow::Result<u8> {
    let interval = parse_duration(&a.interval)?;
    loop {
        let t = super::Target::open(g, &a.id)?;
        if a.stats {
            t.require(
                &[Status::Created, Status::Running],
                "read the statistics of",
            )?;
        } else if !matches!(
            t.status(),
            Status::Created | Status::Running | Status::Paused
        ) {
            return Ok(0);
        }
        if t.status() != Status::Paused {
            let s = t.ask(&Request::Stats)?;
            let ev = json!({"type": "stats", "id": a.id, "data": runc_stats(&s)});
            outln!("{ev}");
        }
        drop(t);
        if a.stats {
            return Ok(0);
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn stats_convert_to_nanoseconds() {
        let v = runc_stats(&json!({"cpu_usage_usec": 3, "memory_usage": 4096, "pids_current": 2}));
        assert_eq!(v["cpu"]["usage"]["total"], 3000);
        assert_eq!(v["memory"]["usage"]["usage"], 4096);
        assert_eq!(v["pids"]["current"], 2);
    }
}
