//! Reads husk's timing spans back from a log: each phase is a span of
//! target `husk_timing` that the logger reports when it closes, with
//! `time.busy` and `time.idle` (see `husk_runtime::timing`). Both of
//! husk's log formats are read: JSON lines (`husk --log-format json`) and
//! text lines (the shim's log, as containerd copies it into its own).

use serde_json::Value;

/// `(phase, milliseconds)` for every timing span closed in `log`, in order.
pub fn phases(log: &str) -> Vec<(String, f64)> {
    log.lines().filter_map(phase).collect()
}

fn phase(line: &str) -> Option<(String, f64)> {
    if let Ok(v) = serde_json::from_str::<Value>(line) {
        if v["target"] != "husk_timing" || v["fields"]["message"] != "close" {
            return None;
        }
        let name = v["span"]["name"].as_str()?.to_string();
        let busy = duration_ms(v["fields"]["time.busy"].as_str()?)?;
        let idle = duration_ms(v["fields"]["time.idle"].as_str()?)?;
        return Some((name, busy + idle));
    }
    // `... INFO pod_boot{sandbox=x}:vm_start: husk_timing: close time.busy=1.2ms time.idle=3µs`
    let (before, after) = line.split_once(" husk_timing: close ")?;
    let chain = before.split_whitespace().last()?.trim_end_matches(':');
    let mut name = String::new();
    let mut depth = 0;
    for c in chain.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ':' if depth == 0 => name.clear(),
            c if depth == 0 => name.push(c),
            _ => {}
        }
    }
    let field = |key: &str| {
        after.split_whitespace().find_map(|w| {
            let v = w.strip_prefix(key)?;
            duration_ms(v.trim_matches(|c| c == '"' || c == '\\'))
        })
    };
    Some((name, field("time.busy=")? + field("time.idle=")?))
}

/// `1.5s`, `12.3ms`, `45.6µs` (or `us`), `789ns` in milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "s" => 1e3,
        "ms" => 1.0,
        "µs" | "us" => 1e-3,
        "ns" => 1e-6,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_span_closes_and_nothing_else() {
        let log = r#"{"timestamp":"t","level":"INFO","fields":{"message":"close","time.busy":"1.5ms","time.idle":"2s"},"target":"husk_timing","span":{"sandbox":"x","name":"pod_boot"},"spans":[]}
{"timestamp":"t","level":"INFO","fields":{"message":"sandbox ready"},"target":"husk_runtime"}
{"timestamp":"t","level":"INFO","fields":{"message":"close","time.busy":"500µs","time.idle":"0.5ms"},"target":"husk_timing","span":{"name":"create"}}
not json"#;
        assert_eq!(
            phases(log),
            [
                ("pod_boot".to_string(), 2001.5),
                ("create".to_string(), 1.0)
            ]
        );
    }

    #[test]
    fn reads_text_span_closes_nested_and_quoted() {
        let log = "2026-12-02T10:00:00Z  INFO pod_boot{sandbox=a:b}:vm_start: husk_timing: close time.busy=3ms time.idle=7ms\n\
                   time=\"x\" level=info msg=\"2026 INFO create{container=c1}: husk_timing: close time.busy=1ms time.idle=250us\" runtime=io.containerd.husk.v2\n\
                   2026 INFO husk_runtime: sandbox ready";
        let got = phases(log);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], ("vm_start".to_string(), 10.0));
        assert_eq!(got[1].0, "create");
        assert!((got[1].1 - 1.25).abs() < 1e-9);
    }

    #[test]
    fn unknown_units_are_not_guessed() {
        assert_eq!(duration_ms("3min"), None);
        assert_eq!(duration_ms("ms"), None);
    }
}
