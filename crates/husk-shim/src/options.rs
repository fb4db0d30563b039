//! Runtime options containerd passes with `Create`: for a runtime other
//! than runc's, `runtimeoptions.v1.Options` (`ctr run --runtime-config-path`,
//! or the CRI's `options.ConfigPath` / `ConfigBody` of a runtime handler)
//! naming or holding the husk config to use for the pod.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;
use husk_runtime::config::Config;

const TYPE: &str = "runtimeoptions.v1.Options";

/// `Options { string type_url = 1; string config_path = 2; string config_body = 3; }`
#[derive(Debug, Default, PartialEq, Eq)]
struct RuntimeOptions {
    config_path: String,
    config_body: String,
}

fn decode(bytes: &[u8]) -> Result<RuntimeOptions, String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut out = RuntimeOptions::default();
    let err = |e: containerd_shim::protos::protobuf::Error| format!("invalid {TYPE}: {e}");
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(err)? {
        match tag {
            18 => out.config_path = input.read_string().map_err(err)?,
            26 => out.config_body = input.read_string().map_err(err)?,
            _ => {
                let wire = containerd_shim::protos::protobuf::rt::WireType::new(tag & 7)
                    .ok_or_else(|| format!("invalid {TYPE}: bad wire type in tag {tag}"))?;
                input.skip_field(wire).map_err(err)?;
            }
        }
    }
    Ok(out)
}

/// The config the options ask for: `None` when they name none (the shim's
/// default config applies).
pub fn config(options: Option<&Any>) -> Option<Result<Config, String>> {
    let any = options?;
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != TYPE {
        return None;
    }
    let opts = match decode(&any.value) {
        Ok(o) => o,
        Err(e) => return Some(Err(e)),
    };
    if !opts.config_body.is_empty() {
        return Some(
            Config::parse(&opts.config_body, std::path::Path::new("<runtime options>"))
                .map_err(|e| husk_runtime::monitor::error_chain(&e)),
        );
    }
    if !opts.config_path.is_empty() {
        return Some(
            Config::load(Some(std::path::Path::new(&opts.config_path)))
                .map(|(c, _)| c)
                .map_err(|e| husk_runtime::monitor::error_chain(&e)),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(out: &mut Vec<u8>, n: u8, s: &str) {
        out.push(n << 3 | 2);
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }

    fn any(value: Vec<u8>) -> Any {
        Any {
            type_url: TYPE.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn a_body_or_a_path_names_the_config() {
        let mut v = Vec::new();
        field(&mut v, 1, "x");
        field(&mut v, 3, "[hypervisor]\nmemory_mib = 300\n");
        let c = config(Some(&any(v))).unwrap().unwrap();
        assert_eq!(c.hypervisor.memory_mib, 300);

        let mut v = Vec::new();
        field(&mut v, 2, "/nonexistent/husk.toml");
        let e = config(Some(&any(v))).unwrap().unwrap_err();
        assert!(e.contains("/nonexistent/husk.toml"), "{e}");
    }

    #[test]
    fn other_options_are_not_ours() {
        assert!(config(None).is_none());
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        assert!(config(Some(&other)).is_none());
        assert!(config(Some(&any(Vec::new()))).is_none());
    }
}
