//! Finding containers and their processes, and reserving their ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use husk_protocol::agent::ProcessInfo;

use super::{ps, Container, ContainerError, Containers, ExecSlot, Slot};
use crate::cgroup::Cgroup;
use crate::process::Process;

/// Checks a container id: it names things in logs and paths.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '.' | '-'))
}

/// Locks a table. A poisoned lock only means a panic elsewhere; the map is
/// still valid.
fn lock<V>(table: &Mutex<HashMap<String, V>>) -> MutexGuard<'_, HashMap<String, V>> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// An id reserved in a table (the containers', or a container's execs')
/// while what it names is being made: removed again when dropped unless
/// [`Reservation::fill`]ed, so that a failed create or exec leaves nothing.
pub(super) struct Reservation<'a, V> {
    table: &'a Mutex<HashMap<String, V>>,
    id: &'a str,
    filled: bool,
}

impl<'a, V> Reservation<'a, V> {
    /// Reserves `id` in `table` with `placeholder`; `None` when the id is
    /// taken.
    pub(super) fn new(
        table: &'a Mutex<HashMap<String, V>>,
        id: &'a str,
        placeholder: V,
    ) -> Option<Self> {
        let mut entries = lock(table);
        if entries.contains_key(id) {
            return None;
        }
        entries.insert(id.to_string(), placeholder);
        Some(Self {
            table,
            id,
            filled: false,
        })
    }

    /// Puts `value` in place of the placeholder, for good.
    pub(super) fn fill(mut self, value: V) {
        lock(self.table).insert(self.id.to_string(), value);
        self.filled = true;
    }
}

impl<V> Drop for Reservation<'_, V> {
    fn drop(&mut self) {
        if !self.filled {
            lock(self.table).remove(self.id);
        }
    }
}

impl Container {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's init process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    pub(super) fn execs(&self) -> MutexGuard<'_, HashMap<String, ExecSlot>> {
        lock(&self.execs)
    }

    /// The exec'd processes that finished starting, by exec id.
    pub(super) fn exec_processes(&self) -> Vec<(String, Arc<Process>)> {
        self.execs()
            .iter()
            .filter_map(|(id, slot)| match slot {
                ExecSlot::Ready(p) => Some((id.clone(), Arc::clone(p))),
                ExecSlot::Starting => None,
            })
            .collect()
    }

    /// Every process of the container the agent can find: its cgroup's,
    /// or (without cgroups) by PID namespace or descent from the init and
    /// the execs.
    pub(super) fn pids(&self) -> Vec<i32> {
        let mut pids = match &self.cgroup {
            Some(cgroup) => cgroup.pids(),
            None => {
                let roots: Vec<i32> = std::iter::once(self.process.pid().as_raw())
                    .chain(self.exec_processes().iter().map(|(_, p)| p.pid().as_raw()))
                    .collect();
                ps::related_pids(&roots, self.pid_namespace)
            }
        };
        let init = self.process.pid().as_raw();
        if self.process.exit_status().is_none() && !pids.contains(&init) {
            pids.push(init);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Containers {
    pub(super) fn table(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        lock(&self.table)
    }

    /// The container `id`, once created.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        match self.table().get(id) {
            Some(Slot::Ready(container)) => Ok(Arc::clone(container)),
            Some(Slot::Creating) => Err(ContainerError::Creating(id.to_string())),
            None => Err(ContainerError::NotFound(id.to_string())),
        }
    }

    /// Process `(id, exec_id)`: the init for an empty exec_id, otherwise
    /// the exec of that id.
    pub fn get_process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        let container = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(Arc::clone(&container.process));
        }
        let execs = container.execs();
        match execs.get(exec_id) {
            Some(ExecSlot::Ready(process)) => Ok(Arc::clone(process)),
            Some(ExecSlot::Starting) => Err(ContainerError::ExecStarting {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
            None => Err(ContainerError::NoSuchProcess {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
        }
    }

    /// The processes of container `id`.
    pub fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, ContainerError> {
        let container = self.get(id)?;
        let execs: HashMap<i32, String> = container
            .exec_processes()
            .into_iter()
            .map(|(exec_id, p)| (p.pid().as_raw(), exec_id))
            .collect();
        Ok(container
            .pids()
            .into_iter()
            .filter_map(|pid| {
                let mut info = ps::process_info(pid)?;
                info.exec_id = execs.get(&pid).cloned().unwrap_or_default();
                Some(info)
            })
            .collect())
    }

    pub(super) fn cgroup_of<'a>(
        &self,
        container: &'a Container,
    ) -> Result<&'a Cgroup, ContainerError> {
        container
            .cgroup
            .as_ref()
            .ok_or_else(|| ContainerError::NoCgroup(container.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_is_undone_unless_filled() {
        let table: Mutex<HashMap<String, u8>> = Mutex::new(HashMap::new());
        let first = Reservation::new(&table, "a", 0).unwrap();
        assert!(Reservation::new(&table, "a", 1).is_none());
        drop(first);
        assert!(lock(&table).is_empty());
        Reservation::new(&table, "a", 0).unwrap().fill(7);
        assert_eq!(lock(&table).get("a"), Some(&7));
        assert!(Reservation::new(&table, "a", 1).is_none());
    }

    #[test]
    fn container_ids() {
        assert!(valid_id("abc-1.2_3"));
        assert!(valid_id("a+b"));
        assert!(valid_id(&"a".repeat(128)));
        assert!(!valid_id(""));
        assert!(!valid_id(".hidden"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"a".repeat(129)));
    }
}
