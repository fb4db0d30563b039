//! `husk template`: the VM template sandboxes are restored from.

use husk_hypervisor::qemu::Qemu;
use husk_hypervisor::SystemProbe;
use husk_runtime::config::Config;
use husk_runtime::template::{self, Store};

use crate::cli::{Format, GlobalOpts, TemplateCommand};

pub fn template(g: &GlobalOpts, cfg: &Config, cmd: TemplateCommand) -> anyhow::Result<u8> {
    let agent_log = super::agent_log_level(g.debug, cfg);
    let store = Store::new(&cfg.template.dir);
    match cmd {
        TemplateCommand::Build => build(cfg, &agent_log, false),
        TemplateCommand::Refresh => {
            let code = build(cfg, &agent_log, true)?;
            let (key, _) = template::current(cfg, &SystemProbe, &agent_log)?;
            for id in store.prune(Some(&key.id)) {
                outln!("removed template {id}");
            }
            Ok(code)
        }
        TemplateCommand::Remove { id } => {
            let ids = match id {
                Some(id) => vec![id],
                None => store.list().into_iter().map(|t| t.id).collect(),
            };
            for id in ids {
                store.remove(&id)?;
                outln!("removed template {id}");
            }
            Ok(0)
        }
        TemplateCommand::Show { format } => show(cfg, &store, &agent_log, format),
    }
}

fn build(cfg: &Config, agent_log: &str, rebuild: bool) -> anyhow::Result<u8> {
    if !cfg.template.enabled {
        eprintln!("husk: note: templates are off in this configuration (template.enabled = false); building anyway");
    }
    let (key, found) = template::current(cfg, &SystemProbe, agent_log)?;
    if found.is_none() || rebuild {
        eprintln!(
            "husk: building VM template {} in {} (boots the guest once and saves it; about 2 s under TCG)",
            key.id,
            cfg.template.dir.display()
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (t, built) = rt.block_on(template::build_current(
        cfg,
        &Qemu,
        &SystemProbe,
        agent_log,
        rebuild,
    ))?;
    let (used, _) = t.disk_usage();
    if built {
        outln!(
            "template {} built in {} ms ({} MiB on disk)",
            t.id,
            t.meta.build_ms,
            used / (1 << 20)
        );
    } else {
        outln!("template {} is built already ({})", t.id, t.meta.built);
    }
    Ok(0)
}

fn show(cfg: &Config, store: &Store, agent_log: &str, format: Format) -> anyhow::Result<u8> {
    let current = template::current(cfg, &SystemProbe, agent_log)
        .map(|(k, _)| k.id)
        .ok();
    let list = store.list();
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = list
                .iter()
                .map(|t| {
                    let (used, apparent) = t.disk_usage();
                    serde_json::json!({
                        "id": t.id,
                        "dir": t.dir,
                        "current": Some(&t.id) == current.as_ref(),
                        "built": t.meta.built,
                        "build_ms": t.meta.build_ms,
                        "disk_bytes": used,
                        "apparent_bytes": apparent,
                        "inputs": t.meta.inputs,
                    })
                })
                .collect();
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Table => {
            outln!(
                "{:<18} {:<8} {:<26} {:>9} {:>10}  KERNEL / INITRD",
                "ID",
                "CURRENT",
                "BUILT",
                "BUILD MS",
                "DISK MIB"
            );
            for t in &list {
                let (used, _) = t.disk_usage();
                outln!(
                    "{:<18} {:<8} {:<26} {:>9} {:>10}  {} / {}",
                    t.id,
                    if Some(&t.id) == current.as_ref() {
                        "yes"
                    } else {
                        "no"
                    },
                    t.meta.built,
                    t.meta.build_ms,
                    used / (1 << 20),
                    t.meta.inputs.kernel.path.display(),
                    t.meta.inputs.initrd.path.display()
                );
            }
            if !cfg.template.enabled {
                outln!("(templates are off in this configuration: template.enabled = false)");
            } else if let Some(id) = current.filter(|id| !list.iter().any(|t| &t.id == id)) {
                outln!("(the current configuration's template {id} is not built: `husk template build`, or the next sandbox builds it)");
            }
        }
    }
    Ok(0)
}
