//! OCI hooks, run on the host with the container's state on stdin.
//!
//! - `prestart` (deprecated) and `createRuntime`: after the container is
//!   created in the guest, before `create` returns; a failure fails create
//!   and removes the sandbox.
//! - `poststart`: after the init was released; failures are logged.
//! - `poststop`: after the sandbox is gone; failures are logged.
//! - `createContainer` and `startContainer` are specified to run inside the
//!   container's namespaces. Those are in the guest, where the hook binaries
//!   (host paths) do not exist, so husk does not run them and logs a
//!   warning when a spec has them.
//!
//! Every hook has a deadline: its own `timeout`, else [`DEFAULT_TIMEOUT`],
//! so a hook that never ends cannot pin a create or a delete. The hooks
//! that run are the ones recorded at create (`poststop` is also kept in
//! the sandbox's `state.json`), never re-read from a `config.json` that may
//! have changed since.

use std::process::Stdio;
use std::time::Duration;

use oci_spec::runtime::Hook;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{kind} hook {path} could not run")]
    Spawn {
        kind: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} hook {path} failed ({status}): {stderr}")]
    Failed {
        kind: &'static str,
        path: String,
        status: String,
        stderr: String,
    },
    #[error("{kind} hook {path} did not finish within {secs} s")]
    Timeout {
        kind: &'static str,
        path: String,
        secs: i64,
    },
}

/// How long a hook without a `timeout` of its own may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `hooks` in order, each with `state` (runc's state JSON) on stdin;
/// stops at the first failure.
pub async fn run(kind: &'static str, hooks: &[Hook], state: &Value) -> Result<(), HookError> {
    for h in hooks {
        run_one(kind, h, state).await?;
    }
    Ok(())
}

/// Like [`run`], but logs failures and goes on (poststart, poststop).
pub async fn run_logged(kind: &'static str, hooks: &[Hook], state: &Value) {
    for h in hooks {
        if let Err(e) = run_one(kind, h, state).await {
            tracing::warn!("{}", crate::monitor::error_chain(&e));
        }
    }
}

async fn run_one(kind: &'static str, h: &Hook, state: &Value) -> Result<(), HookError> {
    run_one_within(kind, h, state, DEFAULT_TIMEOUT).await
}

async fn run_one_within(
    kind: &'static str,
    h: &Hook,
    state: &Value,
    default_timeout: Duration,
) -> Result<(), HookError> {
    let path = h.path().display().to_string();
    let mut cmd = Command::new(h.path());
    // args[0] is the hook's argv[0], as in execve.
    if let Some(args) = h.args() {
        if let Some(first) = args.first() {
            cmd.arg0(first);
        }
        cmd.args(args.iter().skip(1));
    }
    if let Some(env) = h.env() {
        cmd.env_clear();
        for kv in env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        kind,
        path: path.clone(),
        source,
    })?;
    let stdin = child.stdin.take();
    let finished = async move {
        // Inside the deadline: a hook that never reads its stdin must not
        // hold us at a full pipe.
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(state.to_string().as_bytes()).await;
        }
        child.wait_with_output().await
    };
    let limit = match h.timeout() {
        Some(secs) if secs > 0 => Duration::from_secs(secs as u64),
        _ => default_timeout,
    };
    let out = tokio::time::timeout(limit, finished)
        .await
        .map_err(|_| HookError::Timeout {
            kind,
            path: path.clone(),
            secs: limit.as_secs() as i64,
        })?
        .map_err(|source| HookError::Spawn {
            kind,
            path: path.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HookError::Failed {
            kind,
            path,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: serde_json::Value) -> Hook {
        serde_json::from_value(json).unwrap()
    }

    #[tokio::test]
    async fn hooks_get_the_state_and_run_in_order() {
        let dir = std::env::temp_dir().join(format!("husk-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let hooks = vec![
            hook(
                serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat >> {}; echo >> {}", out.display(), out.display())]}),
            ),
            hook(
                serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo second:$X >> {}", out.display())], "env": ["X=1"]}),
            ),
        ];
        run(
            "createRuntime",
            &hooks,
            &serde_json::json!({"id": "c1", "status": "created"}),
        )
        .await
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, "{\"id\":\"c1\",\"status\":\"created\"}\nsecond:1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn failures_and_timeouts_name_the_hook() {
        let bad = vec![hook(
            serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 3"]}),
        )];
        let e = run("prestart", &bad, &Value::Null).await.unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("prestart hook /bin/sh failed") && m.contains("nope"),
            "{m}"
        );
        let slow = vec![hook(
            serde_json::json!({"path": "/bin/sleep", "args": ["sleep", "5"], "timeout": 1}),
        )];
        let e = run("poststart", &slow, &Value::Null).await.unwrap_err();
        assert!(matches!(e, HookError::Timeout { secs: 1, .. }));
        let missing = vec![hook(serde_json::json!({"path": "/nonexistent/hook"}))];
        assert!(matches!(
            run("poststop", &missing, &Value::Null).await,
            Err(HookError::Spawn { .. })
        ));
    }

    #[tokio::test]
    async fn a_hook_without_a_timeout_gets_the_default_one() {
        // It neither reads its stdin nor ends: the deadline covers both.
        let stuck = hook(serde_json::json!({"path": "/bin/sleep", "args": ["sleep", "600"]}));
        let big = Value::String("x".repeat(1 << 20));
        let t0 = std::time::Instant::now();
        let e = run_one_within("poststop", &stuck, &big, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
