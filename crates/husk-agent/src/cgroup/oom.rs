//! OOM events: an inotify watch on `memory.events` of every container's
//! cgroup (the kernel signals a modification when a counter changes), read
//! by one task that starts with the first watched container. When
//! `oom_kill` grew, the container's id is queued; `GetOOMEvent` takes the
//! next id from the queue, waiting for one.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// Queued events beyond this are dropped (nobody is asking for them).
const QUEUE: usize = 1024;

struct Watched {
    id: String,
    events: PathBuf,
    kills: u64,
}

#[derive(Default)]
struct State {
    inotify: Option<Arc<Inotify>>,
    watches: HashMap<WatchDescriptor, Watched>,
}

/// The watcher and its queue.
pub struct OomEvents {
    state: Mutex<State>,
    tx: mpsc::Sender<String>,
    rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
}

impl Default for OomEvents {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            state: Mutex::default(),
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

fn kills_in(events: &PathBuf) -> u64 {
    std::fs::read_to_string(events)
        .map(|t| super::parse_flat(&t).get("oom_kill").copied().unwrap_or(0))
        .unwrap_or(0)
}

impl OomEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches the cgroup at `dir` for container `id`; returns the watch, to
    /// pass to [`OomEvents::unwatch`]. Must run inside the runtime.
    pub fn watch(self: &Arc<Self>, id: &str, dir: PathBuf) -> std::io::Result<WatchDescriptor> {
        let events = dir.join("memory.events");
        let mut state = self.lock();
        let inotify = match &state.inotify {
            Some(inotify) => Arc::clone(inotify),
            None => {
                let inotify = Arc::new(Inotify::init(
                    InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC,
                )?);
                // A second descriptor of the same inotify instance, for the
                // reactor.
                let ready =
                    crate::sys::register_async(File::from(inotify.as_fd().try_clone_to_owned()?))?;
                state.inotify = Some(Arc::clone(&inotify));
                let this = Arc::clone(self);
                let reader = Arc::clone(&inotify);
                tokio::spawn(async move { this.run(reader, ready).await });
                inotify
            }
        };
        let wd = inotify.add_watch(&events, AddWatchFlags::IN_MODIFY)?;
        let kills = kills_in(&events);
        state.watches.insert(
            wd,
            Watched {
                id: id.to_string(),
                events,
                kills,
            },
        );
        Ok(wd)
    }

    /// Stops watching (the container is being removed).
    pub fn unwatch(&self, wd: WatchDescriptor) {
        let mut state = self.lock();
        if state.watches.remove(&wd).is_some() {
            if let Some(inotify) = &state.inotify {
                let _ = inotify.rm_watch(wd);
            }
        }
    }

    /// Checks one watched cgroup now (also called by the reader task).
    pub fn check(&self, wd: WatchDescriptor) {
        let event = {
            let mut state = self.lock();
            let Some(watched) = state.watches.get_mut(&wd) else {
                return;
            };
            let kills = kills_in(&watched.events);
            if kills > watched.kills {
                watched.kills = kills;
                Some(watched.id.clone())
            } else {
                None
            }
        };
        if let Some(id) = event {
            tracing::info!(container = %id, "OOM kill in the container's cgroup");
            if self.tx.try_send(id).is_err() {
                tracing::warn!("the OOM event queue is full; an event was dropped");
            }
        }
    }

    async fn run(self: Arc<Self>, inotify: Arc<Inotify>, ready: AsyncFd<File>) {
        loop {
            let mut guard = match ready.readable().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!("waiting for OOM events failed: {e}");
                    return;
                }
            };
            match guard.try_io(|_| inotify.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => {
                    for event in events {
                        self.check(event.wd);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!("reading OOM events failed: {e}");
                    return;
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// The next OOM-killed container's id, waiting for one.
    pub async fn next(&self) -> String {
        let mut rx = self.rx.lock().await;
        // The sender lives in `self`, so the channel never closes.
        rx.recv().await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// inotify on a plain file stands in for the kernel's memory.events.
    #[tokio::test]
    async fn oom_kills_are_queued_in_order() {
        let dir = std::env::temp_dir().join(format!("husk-oom-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (dir.join("a"), dir.join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("memory.events"), "low 0\noom 0\noom_kill 0\n").unwrap();
        }
        let events = Arc::new(OomEvents::default());
        let wa = events.watch("a", a.clone()).unwrap();
        events.watch("b", b.clone()).unwrap();
        // A change that is not an OOM kill is no event.
        std::fs::write(a.join("memory.events"), "low 0\noom 1\noom_kill 0\n").unwrap();
        std::fs::write(b.join("memory.events"), "low 0\noom 1\noom_kill 1\n").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), events.next());
        assert_eq!(next.await.unwrap(), "b");
        std::fs::write(a.join("memory.events"), "low 0\noom 2\noom_kill 2\n").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), events.next());
        assert_eq!(next.await.unwrap(), "a");
        events.unwatch(wa);
        std::fs::write(a.join("memory.events"), "oom_kill 3\n").unwrap();
        let none = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        assert!(none.is_err(), "an unwatched container reported an event");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
