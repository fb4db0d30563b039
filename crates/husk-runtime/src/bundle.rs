//! OCI bundles: `config.json` plus the root filesystem it names.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {0} does not exist: pass the bundle directory with --bundle")]
    Missing(PathBuf),
    #[error("bundle {0} has no config.json: create one with `husk spec` or `runc spec`")]
    NoConfig(PathBuf),
    #[error("invalid {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: linux.namespaces has no network namespace, which means sharing the host's network stack (podman/docker --network host, ctr --net-host, a Kubernetes hostNetwork pod); a container in a VM cannot share the host's network stack. Give it a network namespace instead: --network none (loopback only), a bridge network or --network slirp4netns (podman), CNI (containerd's CRI, ctr --cni)")]
    HostNetwork { path: PathBuf },
}

/// Whether `spec` asks for the host's network stack: its
/// `linux.namespaces` lists namespaces but no `network` one (`--network
/// host` and its kin drop just that entry). A spec without
/// `linux.namespaces`, or with an empty list (which Go's `omitempty` makes
/// the same JSON), is not refused: its container shares the guest's own
/// network namespace (loopback only), as it shares the guest's others.
pub fn wants_host_network(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|list| {
            !list.is_empty()
                && !list
                    .iter()
                    .any(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        })
}

/// A loaded, validated bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    pub spec: Spec,
    /// Absolute host path of the root filesystem.
    pub rootfs: PathBuf,
}

impl Bundle {
    /// Loads `dir/config.json` and checks what husk relies on.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|c| c.join(dir))
                .unwrap_or_else(|_| dir.to_path_buf())
        };
        if !dir.is_dir() {
            return Err(BundleError::Missing(dir));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(BundleError::NoConfig(dir));
        }
        let invalid = |message: String| BundleError::Invalid {
            path: config.clone(),
            message,
        };
        let text = std::fs::read_to_string(&config).map_err(|e| invalid(e.to_string()))?;
        let spec: Spec = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| invalid("no `root` section: it must name the root filesystem".into()))?;
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            dir.join(root.path())
        };
        if !rootfs.is_dir() {
            return Err(invalid(format!(
                "root.path {} is not a directory",
                rootfs.display()
            )));
        }
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid("no `process` section: nothing to run".into()))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(invalid("process.args is empty: nothing to run".into()));
        }
        if wants_host_network(&spec) {
            return Err(BundleError::HostNetwork { path: config });
        }
        Ok(Bundle { dir, spec, rootfs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rootfs")).unwrap();
        d
    }

    const GOOD: &str = r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#;

    #[test]
    fn loads_a_good_bundle() {
        let d = tmp("good");
        std::fs::write(d.join("config.json"), GOOD).unwrap();
        let b = Bundle::load(&d).unwrap();
        assert_eq!(b.rootfs, d.join("rootfs"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Bundle::load(Path::new("/nonexistent/bundle")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");

        let d = tmp("noconfig");
        let e = Bundle::load(&d).unwrap_err();
        assert!(e.to_string().contains("no config.json"), "{e}");

        std::fs::write(d.join("config.json"), "{ not json").unwrap();
        let e = Bundle::load(&d).unwrap_err();
        assert!(e.to_string().starts_with("invalid "), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");

        std::fs::write(d.join("config.json"), GOOD.replace("[\"sh\"]", "[]")).unwrap();
        let e = Bundle::load(&d).unwrap_err();
        assert!(e.to_string().contains("process.args is empty"), "{e}");

        // Namespaces without a network one: the host's network, refused.
        let host_net = GOOD.replace(
            r#""root""#,
            r#""linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]},"root""#,
        );
        std::fs::write(d.join("config.json"), &host_net).unwrap();
        let e = Bundle::load(&d).unwrap_err();
        assert!(matches!(e, BundleError::HostNetwork { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("cannot share the host's network stack"),
            "{e}"
        );
        assert!(e.to_string().contains("--network none"), "{e}");
        // With a network namespace (or no list at all) it loads.
        std::fs::write(
            d.join("config.json"),
            host_net.replace(
                r#"{"type":"mount"}"#,
                r#"{"type":"mount"},{"type":"network","path":"/run/netns/x"}"#,
            ),
        )
        .unwrap();
        Bundle::load(&d).unwrap();
        std::fs::write(
            d.join("config.json"),
            GOOD.replace(r#""root""#, r#""linux":{"namespaces":[]},"root""#),
        )
        .unwrap();
        Bundle::load(&d).unwrap();

        std::fs::write(d.join("config.json"), GOOD.replace("rootfs", "nope")).unwrap();
        let e = Bundle::load(&d).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
