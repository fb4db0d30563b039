//! Tasks that follow the guest: each process's end, and OOM kills.

use std::sync::Arc;

use husk_runtime::monitor::error_chain;
use husk_runtime::pod::Pod;

use super::Inner;
use crate::events::{self, topics};

/// Waits in the guest for the end of `(cid, exec_id)` (`guest_id` to the
/// agent). A lost agent (the VM died) ends every process with status 255.
pub(super) fn watch_exit(
    inner: Arc<Inner>,
    pod: Arc<Pod>,
    cid: &str,
    exec_id: &str,
    guest_id: &str,
) {
    let (cid, exec_id, guest_id) = (cid.to_string(), exec_id.to_string(), guest_id.to_string());
    tokio::spawn(async move {
        let status = match pod.agent().wait_process(&cid, &guest_id).await {
            Ok(s) => u32::try_from(s.status).unwrap_or(255),
            Err(e) => {
                tracing::warn!(container = %cid, exec = %exec_id, "lost the process: {}", error_chain(&e));
                255
            }
        };
        inner.process_exited(&cid, &exec_id, status).await;
    });
}

/// Passes the guest's OOM kills on to containerd, until the VM goes. The
/// agent notices an OOM kill independently of the process's exit, so the
/// event may come after the container was already deleted (`ctr run --rm`):
/// it is passed on all the same; only this pod's containers live in the guest.
pub(super) fn watch_oom(inner: Arc<Inner>, pod: Arc<Pod>) {
    tokio::spawn(async move {
        while let Ok(cid) = pod.agent().next_oom_event().await {
            tracing::info!(container = %cid, "OOM kill in the guest");
            let ev = events::TaskOOM {
                container_id: cid,
                ..Default::default()
            };
            inner
                .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev))
                .await;
        }
    });
}
