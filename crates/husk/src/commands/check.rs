use husk_hypervisor::SystemProbe;
use husk_runtime::check::run_checks;
use husk_runtime::config::Config;

pub fn check(cfg: &Config) -> anyhow::Result<u8> {
    let findings = run_checks(cfg, nix::unistd::geteuid().is_root(), &SystemProbe);
    let mut ok = true;
    for f in &findings {
        ok &= f.ok;
        outln!(
            "{:<4} {:<13} {}",
            if f.ok { "ok" } else { "FAIL" },
            f.item,
            f.detail
        );
    }
    if ok {
        outln!("this host can run husk sandboxes");
        Ok(0)
    } else {
        outln!("this host cannot run husk sandboxes yet: fix the FAIL lines above");
        Ok(1)
    }
}
