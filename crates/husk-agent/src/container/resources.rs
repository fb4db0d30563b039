//! The cgroup-backed operations: UpdateContainer, StatsContainer and OOM
//! events.

use husk_protocol::agent::StatsContainerResponse;
use oci_spec::runtime::LinuxResources;

use super::{ContainerError, Containers};

impl Containers {
    /// Applies new `linux.resources` to container `id`.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(ContainerError::ResourcesJson)?;
        let notes = self
            .cgroup_of(&container)?
            .apply(&resources)
            .map_err(|source| ContainerError::Cgroup {
                id: id.to_string(),
                source,
            })?;
        for note in notes {
            tracing::warn!(container = id, "{note}");
        }
        tracing::info!(container = id, "resources updated");
        Ok(())
    }

    /// The cgroup statistics of container `id`.
    pub fn stats(&self, id: &str) -> Result<StatsContainerResponse, ContainerError> {
        let container = self.get(id)?;
        Ok(self.cgroup_of(&container)?.stats())
    }

    /// The id of the next container that had an OOM kill, waiting for one.
    pub async fn next_oom_event(&self) -> String {
        self.oom.next().await
    }
}
