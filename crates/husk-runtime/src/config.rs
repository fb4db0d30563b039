//! The husk configuration file (TOML). Every key has a compiled-in default, so
//! an absent default file means "all defaults"; a file named explicitly
//! (`--config` or `HUSK_CONFIG`) must exist.

use std::path::{Path, PathBuf};

use husk_hypervisor::AccelMode;
use serde::{Deserialize, Serialize};

/// The default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/config.toml";
/// The environment variable that names a config file.
pub const CONFIG_ENV: &str = "HUSK_CONFIG";
/// Where `make install` puts the guest kernel and initrd.
pub const DEFAULT_GUEST_DIR: &str = "/usr/local/share/husk";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Log filter for husk and the guest agent (`error`, `warn`, `info`,
    /// `debug`, `trace`, or a tracing filter). `--debug` raises it to `debug`.
    pub log_level: String,
    pub hypervisor: HypervisorConfig,
    pub shared_fs: SharedFsConfig,
    pub agent: AgentConfig,
    pub limits: LimitsConfig,
    pub template: TemplateConfig,
}

/// Where templates live.
pub const DEFAULT_TEMPLATE_DIR: &str = "/var/lib/husk/templates";

/// VM templates (docs/templates.md): a guest booted once and saved; every
/// sandbox of the default size is restored from it instead of booting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateConfig {
    /// `false`: every sandbox boots its guest (and the share is virtio-fs
    /// unless `shared_fs.kind` says otherwise).
    pub enabled: bool,
    /// Where templates are kept (root's, 0700).
    pub dir: PathBuf,
}

impl Default for TemplateConfig {
    fn default() -> Self {
        TemplateConfig {
            enabled: true,
            dir: DEFAULT_TEMPLATE_DIR.into(),
        }
    }
}

/// The largest VM any spec or annotation may ask for (0: the host's), and
/// what the host cgroup allows beyond the VM's size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// Host memory for QEMU itself (TCG's translation cache included),
    /// virtiofsd and the monitor or shim, on top of the guest's RAM.
    pub host_overhead_mib: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_vcpus: 0,
            max_memory_mib: 0,
            host_overhead_mib: 384,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// The QEMU binary.
    pub path: PathBuf,
    /// `auto` (KVM when the CPU has vmx/svm and /dev/kvm is usable, TCG
    /// otherwise), `kvm` or `tcg`.
    pub accel: AccelMode,
    /// The guest kernel (uncompressed `vmlinux` with a PVH note).
    pub kernel: PathBuf,
    /// The guest initrd (cpio with husk-agent as /init).
    pub initrd: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Extra guest kernel parameters.
    pub kernel_params: Vec<String>,
    /// QEMU runs as an unprivileged uid leased from
    /// `uid_first..uid_first+uid_count` (gid = uid), one per sandbox; used
    /// with virtio-fs (9p keeps QEMU root: see docs/threat-model.md).
    pub uid_first: u32,
    pub uid_count: u32,
    /// Where the uid leases' lock files live.
    pub uid_lock_dir: PathBuf,
    /// The guest console log never grows past this (its tail is kept).
    pub console_log_limit_bytes: u64,
    /// TCG's translation buffer in MiB (`-accel tcg,tb-size=`); 0 leaves
    /// QEMU's default. 16 by measurement (docs/performance.md: 38 MiB of
    /// host PSS per idle templated sandbox against 47 with 32 or QEMU's
    /// default).
    pub tcg_tb_size_mib: u32,
    /// Host CPUs to pin QEMU to: derived from the owning container's
    /// `linux.resources.cpu.cpus` (see `sizing.rs`), never read from the file.
    #[serde(skip)]
    pub host_cpus: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SharedFsKind {
    /// With templates (the default), 9p: a vhost-user device (virtio-fs)
    /// cannot be saved in a template (docs/templates.md). Without, virtio-fs,
    /// and an error naming the fix when virtiofsd is not found (9p is never
    /// a silent fallback).
    #[default]
    Auto,
    Virtiofs,
    #[serde(rename = "9p")]
    NineP,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SharedFsConfig {
    pub kind: SharedFsKind,
    /// The virtiofsd binary; empty means search PATH and the usual places.
    pub virtiofsd: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// How long the guest may take from QEMU start to a ready agent.
    pub boot_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: "warn".into(),
            hypervisor: HypervisorConfig::default(),
            shared_fs: SharedFsConfig::default(),
            agent: AgentConfig::default(),
            limits: LimitsConfig::default(),
            template: TemplateConfig::default(),
        }
    }
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            path: "/usr/bin/qemu-system-x86_64".into(),
            accel: AccelMode::Auto,
            kernel: Path::new(DEFAULT_GUEST_DIR).join("vmlinux"),
            initrd: Path::new(DEFAULT_GUEST_DIR).join("initrd.img"),
            vcpus: 1,
            memory_mib: 256,
            kernel_params: Vec::new(),
            uid_first: 2_000_000_000,
            uid_count: 65_536,
            uid_lock_dir: "/run/husk-uids".into(),
            console_log_limit_bytes: 1 << 20,
            tcg_tb_size_mib: 16,
            host_cpus: None,
        }
    }
}

impl Default for SharedFsConfig {
    fn default() -> Self {
        SharedFsConfig {
            kind: SharedFsKind::Auto,
            virtiofsd: PathBuf::new(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            boot_timeout_secs: 30,
        }
    }
}

impl Config {
    /// Parses a config from TOML text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }

    /// Loads the config: `explicit` (from `--config`), else `$HUSK_CONFIG`,
    /// else the default file if it exists, else the defaults. Returns the
    /// config and the file it came from.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let named = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
        let path = match named {
            Some(p) => p,
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                if !p.exists() {
                    return Ok((Config::default(), None));
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Ok((Config::parse(&text, &path)?, Some(path)))
    }

    /// The virtiofsd binary to use, if any can be found.
    pub fn find_virtiofsd(&self) -> Option<PathBuf> {
        if !self.shared_fs.virtiofsd.as_os_str().is_empty() {
            return Some(self.shared_fs.virtiofsd.clone());
        }
        let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("virtiofsd"))
                    .collect()
            })
            .unwrap_or_default();
        candidates.extend(
            [
                "/usr/local/bin/virtiofsd",
                "/usr/libexec/virtiofsd",
                "/usr/lib/qemu/virtiofsd",
                "/root/.cargo/bin/virtiofsd",
            ]
            .map(PathBuf::from),
        );
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
        }
        candidates.into_iter().find(|p| p.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            Config::parse("", Path::new("x")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn keys_override_defaults() {
        let c = Config::parse(
            "log_level = \"debug\"\n[hypervisor]\naccel = \"tcg\"\nmemory_mib = 512\n[shared_fs]\nkind = \"9p\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.hypervisor.accel, AccelMode::Tcg);
        assert_eq!(c.hypervisor.memory_mib, 512);
        assert_eq!(c.hypervisor.vcpus, 1);
        assert_eq!(c.shared_fs.kind, SharedFsKind::NineP);
    }

    #[test]
    fn confinement_keys_have_defaults_and_parse() {
        let d = Config::default().hypervisor;
        assert_eq!(d.uid_first, 2_000_000_000);
        assert_eq!(d.uid_count, 65_536);
        assert_eq!(d.uid_lock_dir, Path::new("/run/husk-uids"));
        assert_eq!(d.console_log_limit_bytes, 1 << 20);
        let c = Config::parse(
            "[hypervisor]\nuid_first = 3000000000\nuid_count = 4\nuid_lock_dir = \"/tmp/u\"\nconsole_log_limit_bytes = 65536\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.hypervisor.uid_first, 3_000_000_000);
        assert_eq!(c.hypervisor.uid_count, 4);
        assert_eq!(c.hypervisor.uid_lock_dir, Path::new("/tmp/u"));
        assert_eq!(c.hypervisor.console_log_limit_bytes, 65536);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_file() {
        let e = Config::parse("[hypervisor]\nmemory = 5\n", Path::new("/etc/x.toml")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("/etc/x.toml"), "{m}");
        assert!(m.contains("memory"), "{m}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/husk.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/husk.toml"));
    }
}
