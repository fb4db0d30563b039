//! The stage protocol: how the agent and a stage it launched (`husk-agent
//! init` or `husk-agent exec`) talk. The stage gets its descriptors at fixed
//! numbers; it reads its instructions (JSON) from [`CONFIG_FD`] until
//! end-of-file, writes [`StageMessage`]s to [`STATUS_FD`] (one JSON object
//! a line), and waits on [`START_FD`] for the agent's go. The status pipe
//! is close-on-exec: end-of-file after the go means the program runs.
//!
//! The agent's side is `launch.rs`, the stage's side `stage.rs`.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

/// Where a stage reads its instructions (JSON, until end-of-file).
pub const CONFIG_FD: RawFd = 3;
/// Where a stage writes [`StageMessage`]s, one JSON object per line.
pub const STATUS_FD: RawFd = 4;
/// Where a stage waits for the agent's go: one byte means start, end-of-file
/// means the agent gave up on it (the container was removed first).
pub const START_FD: RawFd = 5;
/// Where a stage whose process has a terminal finds its end of the console
/// socket, on which it sends the terminal's master to the agent.
pub const CONSOLE_FD: RawFd = 6;
/// Where the cloned init reads its hold byte from, before it execs the
/// stage (it closes it then; the init stage keeps only fds 0-6).
pub const HOLD_FD: RawFd = 7;

/// The byte the agent writes on [`START_FD`] for go.
pub const GO: &[u8] = b"s";
/// The byte the agent writes on [`HOLD_FD`] once it placed the held clone.
pub const RELEASE: &[u8] = b"g";

/// What a stage reports on its status pipe, one JSON object per line.
/// A successful exec closes the pipe (it is close-on-exec): end-of-file after
/// `Ready` (or the go) means the program runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageMessage {
    /// Something was skipped; the agent logs it.
    Warning(String),
    /// Setup is done; the init blocks until the agent says start.
    Ready,
    /// The exec stage forked the process to run (its pid in the agent's
    /// PID namespace); it waits for the agent's go.
    Pid(i32),
    /// Setup or exec failed; the stage exits.
    Error {
        /// What failed, for the error reply.
        message: String,
        /// Whether the spec is at fault (bad command, bad user...).
        invalid_spec: bool,
    },
}

/// One message as the line a stage writes.
pub fn encode(message: &StageMessage) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// One line the agent read (with or without its newline) as a message.
pub fn decode(line: &str) -> serde_json::Result<StageMessage> {
    serde_json::from_str(line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_json_lines() {
        let messages = [
            StageMessage::Warning("w".to_string()),
            StageMessage::Ready,
            StageMessage::Pid(42),
            StageMessage::Error {
                message: "no".to_string(),
                invalid_spec: true,
            },
        ];
        for message in messages {
            let line = encode(&message);
            assert_eq!(line.last(), Some(&b'\n'));
            let text = String::from_utf8(line).unwrap();
            assert_eq!(text.matches('\n').count(), 1);
            assert_eq!(decode(&text).unwrap(), message);
        }
        assert_eq!(encode(&StageMessage::Ready), b"\"ready\"\n");
        assert!(decode("{not json").is_err());
    }
}
