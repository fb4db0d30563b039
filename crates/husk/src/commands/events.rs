use std::time::Duration;

use anyhow::Context;
use husk_runtime::agent::Stats;
use husk_runtime::monitor::api::{Request, Response};
use husk_runtime::status::Verb;
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
pub fn runc_stats(s: &Stats) -> Value {
    json!({
        "cpu": {
            "usage": {
                "total": s.cpu_usage_usec * 1000,
                "kernel": s.cpu_system_usec * 1000,
                "user": s.cpu_user_usec * 1000,
            },
            "throttling": {
                "periods": s.cpu_nr_periods,
                "throttledPeriods": s.cpu_nr_throttled,
                "throttledTime": s.cpu_throttled_usec * 1000,
            }
        },
        "memory": {
            "usage": {"limit": s.memory_limit, "usage": s.memory_usage, "max": s.memory_peak, "failcnt": s.memory_oom_kills},
            "swap": {"usage": s.memory_swap_usage},
            "raw": s.memory_stat,
        },
        "pids": {"current": s.pids_current, "limit": s.pids_limit},
    })
}

pub fn events(g: &GlobalOpts, a: EventsArgs) -> anyhow::Result<u8> {
    let interval = parse_duration(&a.interval)?;
    loop {
        let t = super::Target::open(g, &a.id)?;
        if a.stats {
            t.require(Verb::Inspect)?;
        } else if !t.status().can_inspect() {
            return Ok(0);
        }
        let Response::Stats { stats } = t.ask(&Request::Stats)? else {
            anyhow::bail!("the monitor of {} answered Stats with something else", a.id);
        };
        let ev = json!({"type": "stats", "id": a.id, "data": runc_stats(&stats)});
        outln!("{ev}");
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
        let v = runc_stats(&Stats {
            cpu_usage_usec: 3,
            memory_usage: 4096,
            pids_current: 2,
            ..Default::default()
        });
        assert_eq!(v["cpu"]["usage"]["total"], 3000);
        assert_eq!(v["memory"]["usage"]["usage"], 4096);
        assert_eq!(v["pids"]["current"], 2);
    }
}
