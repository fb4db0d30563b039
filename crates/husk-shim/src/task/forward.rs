//! Passes the sandbox's events on to containerd: each process's end (never
//! before its start was reported) and OOM kills.

use std::sync::Arc;

use husk_runtime::sandbox::{Event, Sandbox};
use tokio::sync::broadcast::error::RecvError;

use super::Inner;
use crate::events::{self, topics};

pub(super) fn forward_events(inner: Arc<Inner>, sandbox: &Sandbox) {
    let mut rx = sandbox.events();
    let pid = sandbox.host_pid();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(Event::Exited { cid, exec_id, exit }) => {
                    let event = events::TaskExit {
                        container_id: cid.clone(),
                        id: if exec_id.is_empty() {
                            cid.clone()
                        } else {
                            exec_id.clone()
                        },
                        pid,
                        exit_status: u32::try_from(exit.status.status).unwrap_or(255),
                        exited_at: Some(events::timestamp(exit.at)).into(),
                        ..Default::default()
                    };
                    // Held back while its start is being reported.
                    let held = {
                        let mut t = inner.lock();
                        let key = (cid, exec_id);
                        if t.starting.contains(&key) {
                            t.deferred.insert(key, event.clone());
                            true
                        } else {
                            false
                        }
                    };
                    if !held {
                        inner
                            .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
                            .await;
                    }
                }
                // The agent notices an OOM kill independently of the exit,
                // so it may come after the container was deleted (`ctr run
                // --rm`); it is passed on all the same (the sandbox already
                // dropped any for containers it never held).
                Ok(Event::Oom { cid }) => {
                    let ev = events::TaskOOM {
                        container_id: cid,
                        ..Default::default()
                    };
                    inner
                        .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev))
                        .await;
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "sandbox events were dropped");
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}
