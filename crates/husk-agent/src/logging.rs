//! Logging to stderr (the guest console in the VM), with a filter from the
//! kernel command line (`husk.log=`) or the environment.

use tracing_subscriber::EnvFilter;

/// The filter when nothing says otherwise.
pub const DEFAULT_FILTER: &str = "info";

/// The value of `husk.log=` on a kernel command line (the last one wins, as
/// with every kernel parameter).
pub fn filter_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline_value(cmdline, husk_protocol::KERNEL_LOG_PARAM)
}

/// The last non-empty value of `key=` on the kernel command line.
pub fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    let key = format!("{key}=");
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(key.as_str()))
        .next_back()
        .map(|value| value.trim_matches('"').to_string())
        .filter(|value| !value.is_empty())
}

/// Installs the global subscriber. An unparsable filter falls back to
/// [`DEFAULT_FILTER`] (and says so) rather than leaving the agent mute.
pub fn init(filter: &str) {
    let (env_filter, bad) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some(e)),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    if let Some(e) = bad {
        tracing::warn!("log filter {filter:?} is invalid ({e}); using {DEFAULT_FILTER:?}");
    }
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_filter_from_the_cmdline() {
        let cmdline =
            "console=ttyS0 reboot=t panic=-1 rdinit=/init quiet husk.log=debug,ttrpc=info\n";
        assert_eq!(
            filter_from_cmdline(cmdline).as_deref(),
            Some("debug,ttrpc=info")
        );
        assert_eq!(
            filter_from_cmdline("quiet husk.log=a husk.log=b").as_deref(),
            Some("b")
        );
        assert_eq!(filter_from_cmdline("console=ttyS0 quiet"), None);
        assert_eq!(filter_from_cmdline("husk.log="), None);
        assert_eq!(filter_from_cmdline("xhusk.log=debug"), None);
    }
}
