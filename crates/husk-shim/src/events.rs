//! Task events sent to containerd (`/tasks/create`, `/tasks/exit`, ...),
//! through the `containerd-shim` crate's publisher (which queues, and
//! reconnects and retries while containerd restarts).

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;

pub use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
pub use containerd_shim::protos::topics;

/// Where the shim's events go: containerd, or (in tests) a list.
pub enum Events {
    Remote {
        publisher: RemotePublisher,
        namespace: String,
    },
    /// Keeps each event's topic, in order (tests of the task service).
    #[cfg_attr(not(test), allow(dead_code))]
    Recorded(Arc<Mutex<Vec<String>>>),
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Events {
        Events::Remote {
            publisher,
            namespace,
        }
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        tracing::debug!(topic, "publishing event");
        match self {
            Events::Remote {
                publisher,
                namespace,
            } => {
                if let Err(e) = publisher
                    .publish(Context::default(), topic, namespace, event)
                    .await
                {
                    tracing::warn!(topic, error = %e, "cannot publish event");
                }
            }
            Events::Recorded(topics) => topics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(topic.to_string()),
        }
    }
}

/// `t` as a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}
