//! Timing marks. Each phase of a sandbox's life is a `tracing` span of
//! target [`TIMING`]: `pod_boot` (sizing and boot, around `vm_start`, QEMU
//! up to its sockets, and `agent_ready`, kernel boot to the agent's
//! handshake), `create`, `start` and `teardown`. The front ends' loggers
//! report each span when it closes, with `time.busy` and `time.idle` (the
//! sum is the phase's wall time); the benches read those lines
//! (`HUSK_LOG=husk_timing=info`). No phase keeps a clock of its own.

use tracing_subscriber::fmt::format::FmtSpan;

/// The target of every timing span.
pub const TIMING: &str = "husk_timing";

/// What a `tracing_subscriber::fmt` logger reports of spans: their close,
/// with the time spent in them.
pub const SPAN_EVENTS: FmtSpan = FmtSpan::CLOSE;
