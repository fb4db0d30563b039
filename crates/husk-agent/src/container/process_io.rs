//! A container process's stdin and terminal size.

use super::{ContainerError, Containers};

impl Containers {
    /// Writes to a process's stdin.
    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, ContainerError> {
        let process = self.get_process(id, exec_id)?;
        process
            .stdin
            .write(data)
            .await
            .map_err(|source| ContainerError::Stdin {
                id: id.to_string(),
                source,
            })
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let process = self.get_process(id, exec_id)?;
        process
            .stdin
            .close()
            .await
            .map_err(|source| ContainerError::Stdin {
                id: id.to_string(),
                source,
            })
    }

    /// Sets the terminal size of process `(id, exec_id)`.
    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ContainerError> {
        let process = self.get_process(id, exec_id)?;
        let Some(terminal) = process.terminal() else {
            return Err(ContainerError::NoTerminal {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        };
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        crate::sys::set_window_size(terminal, clamp(rows), clamp(cols)).map_err(|source| {
            ContainerError::Io {
                id: id.to_string(),
                what: "setting the terminal size",
                source,
            }
        })
    }
}
