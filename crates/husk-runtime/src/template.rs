//! VM templates: a guest booted once, saved, and restored for every new
//! sandbox (docs/templates.md).
//!
//! A template is a directory under `template.dir` named by its [`Key`]: the
//! guest's RAM (`memory`, a sparse file the template's QEMU wrote through a
//! shared mapping), its device state (`state`, saved with `x-ignore-shared`,
//! so without the RAM) and `template.json` (its inputs and what building it
//! took). A sandbox restored from it maps `memory` privately: the pages of
//! the guest kernel, initrd and agent stay shared between every sandbox of
//! the host until one writes them.
//!
//! The key is a hash of everything the saved guest depends on: the QEMU
//! binary, the kernel and initrd (by identity: device, inode, size, mtime),
//! the machine (acceleration, vCPUs, memory, kernel command line, TCG
//! buffer) and husk's version. Anything else changed makes another key, so
//! a stale template is never used; [`Store::prune`] removes the others.
//!
//! Building is serialised per key by a lock file; a build that fails or is
//! killed leaves only its `*.building-<pid>` directory, which the next
//! build of that key removes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_hypervisor::accel::HostProbe;
use husk_hypervisor::{GuestMemory, Hypervisor, SharedFs};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::agent::{AgentClient, Call, TtrpcConn};
use crate::config::{Config, SharedFsKind};
use crate::sandbox::boot::{Machine, VmPaths};

/// Bumped whenever what a template holds changes shape.
pub const TEMPLATE_FORMAT: u32 = 1;

/// The MAC of the template's NIC. Every restored guest boots with it; the
/// agent gives the NIC the MAC of the sandbox's interface
/// (`ConfigureNetwork` finds it by this boot MAC). Locally administered.
pub const TEMPLATE_NIC_MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x00];

/// The template's files.
pub const MEMORY_FILE: &str = "memory";
pub const STATE_FILE: &str = "state";
pub const META_FILE: &str = "template.json";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no template {0}: `husk template show` lists them")]
    NotFound(String),
    #[error("building the VM template: {0}")]
    Build(String),
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> TemplateError {
    move |source| TemplateError::Io { context, source }
}

/// One input file, by identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let m = fs::metadata(path)?;
        Ok(FileId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }
}

/// Everything a saved guest depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub format: u32,
    pub husk_version: String,
    pub qemu: FileId,
    pub kernel: FileId,
    pub initrd: FileId,
    pub accel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel_cmdline: String,
    pub tcg_tb_size_mib: u32,
    pub share_tag: String,
    pub agent_port: String,
}

/// A template's name: the first 16 hex digits of the inputs' SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub inputs: Inputs,
}

impl Key {
    pub fn new(inputs: Inputs) -> Key {
        let json = serde_json::to_vec(&inputs).expect("inputs serialise");
        let digest = Sha256::digest(&json);
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Key { id, inputs }
    }
}

/// What `template.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub inputs: Inputs,
    /// When it was built (RFC 3339).
    pub built: String,
    /// How long building it took, QEMU start to saved state.
    pub build_ms: u64,
}

/// A built template.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub id: String,
    pub meta: Meta,
}

impl Template {
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    /// Bytes its files take on disk (the memory file is sparse) and their
    /// apparent size.
    pub fn disk_usage(&self) -> (u64, u64) {
        let mut used = 0;
        let mut apparent = 0;
        for f in [MEMORY_FILE, STATE_FILE, META_FILE] {
            if let Ok(m) = fs::metadata(self.dir.join(f)) {
                used += m.blocks() * 512;
                apparent += m.size();
            }
        }
        (used, apparent)
    }
}

/// The directory of templates.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Where a build in progress puts its files, and what it hands back.
pub struct Building {
    pub dir: PathBuf,
    final_dir: PathBuf,
    id: String,
    started: Instant,
    inputs: Inputs,
    _lock: KeyLock,
}

impl Building {
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    /// A scratch path inside the build dir (sockets, logs, the empty share).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Publishes the build: writes `template.json`, removes the scratch
    /// files, and renames the directory into place.
    pub fn finish(self) -> Result<Template, TemplateError> {
        let meta = Meta {
            inputs: self.inputs.clone(),
            built: crate::state::now_rfc3339(),
            build_ms: self.started.elapsed().as_millis() as u64,
        };
        for entry in fs::read_dir(&self.dir)
            .map_err(io_err(format!("cannot list {}", self.dir.display())))?
            .flatten()
        {
            let name = entry.file_name();
            if name != MEMORY_FILE && name != STATE_FILE {
                let p = entry.path();
                let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
            }
        }
        for f in [MEMORY_FILE, STATE_FILE] {
            let p = self.dir.join(f);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("cannot restrict {}", p.display())))?;
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err(format!("cannot sync {}", p.display())))?;
        }
        let meta_path = self.dir.join(META_FILE);
        let mut f = fs::File::create(&meta_path)
            .map_err(io_err(format!("cannot write {}", meta_path.display())))?;
        f.write_all(&serde_json::to_vec_pretty(&meta).expect("meta serialises"))
            .and_then(|()| f.sync_all())
            .map_err(io_err(format!("cannot write {}", meta_path.display())))?;
        fs::rename(&self.dir, &self.final_dir).map_err(io_err(format!(
            "cannot move {} to {}",
            self.dir.display(),
            self.final_dir.display()
        )))?;
        Ok(Template {
            dir: self.final_dir.clone(),
            id: self.id.clone(),
            meta,
        })
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        // Unfinished (finish renamed it away otherwise).
        if self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Either the template was there (maybe built by someone else while this
/// process waited for the lock), or this process must build it.
pub enum Lookup {
    Ready(Template),
    Build(Building),
}

impl Store {
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The template of `key`, if built.
    pub fn find(&self, key: &Key) -> Option<Template> {
        let t = self.load(&key.id)?;
        (t.meta.inputs == key.inputs).then_some(t)
    }

    fn load(&self, id: &str) -> Option<Template> {
        let dir = self.root.join(id);
        let meta: Meta = serde_json::from_slice(&fs::read(dir.join(META_FILE)).ok()?).ok()?;
        if !dir.join(MEMORY_FILE).is_file() || !dir.join(STATE_FILE).is_file() {
            return None;
        }
        Some(Template {
            dir,
            id: id.to_string(),
            meta,
        })
    }

    /// Every built template.
    pub fn list(&self) -> Vec<Template> {
        let mut v: Vec<Template> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                if name.contains('.') {
                    return None;
                }
                self.load(&name)
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The template of `key`, or, under the key's lock (waiting for a build
    /// another process is doing), a fresh build directory.
    pub fn lookup(&self, key: &Key) -> Result<Lookup, TemplateError> {
        if let Some(t) = self.find(key) {
            return Ok(Lookup::Ready(t));
        }
        fs::create_dir_all(&self.root)
            .map_err(io_err(format!("cannot create {}", self.root.display())))?;
        let _ = fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700));
        let lock = self.lock(&key.id)?;
        if let Some(t) = self.find(key) {
            return Ok(Lookup::Ready(t));
        }
        // Leftovers of builds of this key that died, and an outdated
        // template under the same name.
        self.remove_builds_of(&key.id);
        let final_dir = self.root.join(&key.id);
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir)
                .map_err(io_err(format!("cannot remove {}", final_dir.display())))?;
        }
        let dir = self
            .root
            .join(format!("{}.building-{}", key.id, std::process::id()));
        fs::create_dir(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
        Ok(Lookup::Build(Building {
            dir,
            final_dir,
            id: key.id.clone(),
            started: Instant::now(),
            inputs: key.inputs.clone(),
            _lock: lock,
        }))
    }

    fn remove_builds_of(&self, id: &str) {
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{id}.building-")) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes the template `id` (waiting for a build of it to end).
    pub fn remove(&self, id: &str) -> Result<(), TemplateError> {
        let dir = self.root.join(id);
        if id.is_empty() || id.contains('/') || id.contains('.') || !dir.is_dir() {
            return Err(TemplateError::NotFound(id.to_string()));
        }
        let _lock = self.lock(id)?;
        // A sandbox restored from it keeps its mapping: the pages stay
        // until its QEMU exits.
        fs::remove_dir_all(&dir).map_err(io_err(format!("cannot remove {}", dir.display())))?;
        self.remove_builds_of(id);
        let _ = fs::remove_file(self.lock_path(id));
        Ok(())
    }

    fn lock_path(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.lock"))
    }

    /// Holds the lock of template `id` (waiting for whoever holds it).
    fn lock(&self, id: &str) -> Result<KeyLock, TemplateError> {
        let path = self.lock_path(id);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("cannot open {}", path.display())))?;
        lock_exclusive(file).map_err(io_err(format!("cannot lock {}", path.display())))
    }

    /// Removes the templates `key` replaces: those built from the same
    /// QEMU, kernel and initrd paths and machine whose files (or husk) have
    /// changed since. Templates of other configurations stay. Returns the
    /// ids removed.
    pub fn prune_replaced_by(&self, key: &Key) -> Vec<String> {
        let new = &key.inputs;
        let mut removed = Vec::new();
        for t in self.list() {
            let old = &t.meta.inputs;
            let same_config = old.qemu.path == new.qemu.path
                && old.kernel.path == new.kernel.path
                && old.initrd.path == new.initrd.path
                && old.kernel_cmdline == new.kernel_cmdline
                && old.vcpus == new.vcpus
                && old.memory_mib == new.memory_mib
                && old.tcg_tb_size_mib == new.tcg_tb_size_mib;
            if t.id != key.id && same_config && self.remove(&t.id).is_ok() {
                removed.push(t.id);
            }
        }
        removed
    }

    /// Removes every template but `keep`; returns the ids removed.
    pub fn prune(&self, keep: Option<&str>) -> Vec<String> {
        let mut removed = Vec::new();
        for t in self.list() {
            if Some(t.id.as_str()) != keep && self.remove(&t.id).is_ok() {
                removed.push(t.id);
            }
        }
        removed
    }
}

/// Why a sandbox boots its guest instead of restoring the template; `Ok`
/// when it can be restored. `sized` is `cfg` sized for the sandbox.
pub fn eligible(cfg: &Config, sized: &Config, nics: usize) -> Result<(), &'static str> {
    if !cfg.template.enabled {
        return Err("templates are off (template.enabled = false)");
    }
    if cfg.shared_fs.kind == SharedFsKind::Virtiofs {
        return Err(
            "shared_fs.kind = \"virtiofs\": a vhost-user device cannot be saved in a template",
        );
    }
    if sized.hypervisor.vcpus != cfg.hypervisor.vcpus
        || sized.hypervisor.memory_mib != cfg.hypervisor.memory_mib
    {
        return Err("the sandbox is sized by its spec, the template has the configured size");
    }
    let h = &cfg.hypervisor;
    if !(h.path.is_file() && h.kernel.is_file() && h.initrd.is_file()) {
        // Booting names what is missing.
        return Err("the QEMU binary, guest kernel or initrd is missing");
    }
    if nics > 1 {
        return Err("the sandbox has more than one network interface; the template has one NIC");
    }
    Ok(())
}

/// The template's NIC, with no backend (a sandbox without a network gets it
/// like that too).
pub fn template_nic() -> husk_hypervisor::Nic {
    husk_hypervisor::Nic {
        tap: None,
        mac: TEMPLATE_NIC_MAC,
    }
}

/// What a restored sandbox `id` is told before anything runs in it: host
/// entropy, the host's time, and a hostname of its own.
pub fn renew_identity(id: &str) -> Result<Call, TemplateError> {
    use std::io::Read;
    let mut entropy = vec![0u8; 64];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(io_err("cannot read host entropy from /dev/urandom".into()))?;
    let hostname: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let hostname = hostname.trim_start_matches('-').to_string();
    Ok(Call::RenewIdentity {
        entropy,
        realtime: std::time::SystemTime::now(),
        hostname: if hostname.is_empty() {
            "husk".into()
        } else {
            hostname
        },
    })
}

/// The machine of `cfg` on this host, as a templated sandbox has it.
fn machine_of(cfg: &Config, probe: &(dyn HostProbe + Sync), agent_log: &str) -> Machine {
    let accel = husk_hypervisor::accel::choose(cfg.hypervisor.accel, probe).accel;
    Machine::new(cfg, accel, probe, agent_log, true)
}

/// The key of the template sandboxes of `cfg` (agent log filter
/// `agent_log`) are restored from, and that template if it is built.
pub fn current(
    cfg: &Config,
    probe: &(dyn HostProbe + Sync),
    agent_log: &str,
) -> Result<(Key, Option<Template>), TemplateError> {
    let key = key_of(&machine_of(cfg, probe, agent_log))?;
    let found = Store::new(&cfg.template.dir).find(&key);
    Ok((key, found))
}

/// Builds the template of `cfg` unless it is built (with `rebuild`, even
/// then). Returns it and whether this call built it.
pub async fn build_current(
    cfg: &Config,
    hv: &dyn Hypervisor,
    probe: &(dyn HostProbe + Sync),
    agent_log: &str,
    rebuild: bool,
) -> Result<(Template, bool), TemplateError> {
    let machine = machine_of(cfg, probe, agent_log);
    let key = key_of(&machine)?;
    let store = Store::new(&cfg.template.dir);
    if rebuild && store.find(&key).is_some() {
        store.remove(&key.id)?;
    }
    if let Some(t) = store.find(&key) {
        return Ok((t, false));
    }
    ensure(cfg, hv, &machine).await.map(|t| (t, true))
}

/// The key of the template a VM of `machine` would be restored from.
pub(crate) fn key_of(machine: &Machine) -> Result<Key, TemplateError> {
    let h = &machine.cfg.hypervisor;
    let id = |what: &str, p: &Path| {
        FileId::of(p).map_err(io_err(format!("cannot read the {what} {}", p.display())))
    };
    let spec = machine.spec(
        "template",
        &SharedFs::NineP,
        VmPaths {
            share_dir: PathBuf::new(),
            agent_socket: PathBuf::new(),
            qmp_socket: PathBuf::new(),
            console_log: PathBuf::new(),
            hypervisor_log: PathBuf::new(),
        },
        Vec::new(),
        None,
        GuestMemory::Fresh,
    );
    Ok(Key::new(Inputs {
        format: TEMPLATE_FORMAT,
        husk_version: env!("CARGO_PKG_VERSION").to_string(),
        qemu: id("QEMU binary", &h.path)?,
        kernel: id("guest kernel", &h.kernel)?,
        initrd: id("guest initrd", &h.initrd)?,
        accel: machine.accel.to_string(),
        vcpus: h.vcpus,
        memory_mib: h.memory_mib,
        kernel_cmdline: husk_hypervisor::qemu::cmdline::kernel_cmdline(&spec),
        tcg_tb_size_mib: h.tcg_tb_size_mib,
        share_tag: spec.share_tag,
        agent_port: spec.agent_port,
    }))
}

/// The template of `machine`, built now if there is none (logged: it takes
/// a guest boot, about 1-2 s under TCG).
pub(crate) async fn ensure(
    cfg: &Config,
    hv: &dyn Hypervisor,
    machine: &Machine,
) -> Result<Template, TemplateError> {
    let key = key_of(machine)?;
    let store = Store::new(&cfg.template.dir);
    let k = key.clone();
    let lookup = tokio::task::spawn_blocking(move || store.lookup(&k))
        .await
        .map_err(|e| TemplateError::Build(format!("the template lookup panicked: {e}")))??;
    match lookup {
        Lookup::Ready(t) => Ok(t),
        Lookup::Build(b) => {
            tracing::info!(template = %key.id, "building the VM template (boots the guest once, about 2 s under TCG)");
            let t = build(cfg, hv, machine, b).await?;
            tracing::info!(template = %t.id, build_ms = t.meta.build_ms, "VM template built");
            let store = Store::new(&cfg.template.dir);
            for id in store.prune_replaced_by(&key) {
                tracing::info!(template = %id, "removed the VM template this one replaces");
            }
            Ok(t)
        }
    }
}

/// Boots the template's guest into `b`, waits for its agent, saves it.
async fn build(
    cfg: &Config,
    hv: &dyn Hypervisor,
    machine: &Machine,
    b: Building,
) -> Result<Template, TemplateError> {
    let share = b.scratch("share");
    fs::create_dir(&share).map_err(io_err(format!("cannot create {}", share.display())))?;
    let spec = machine.spec(
        &format!("template-{}", b.id),
        &SharedFs::NineP,
        VmPaths {
            share_dir: share,
            agent_socket: b.scratch("agent.sock"),
            qmp_socket: b.scratch("qmp.sock"),
            console_log: b.scratch("console.log"),
            hypervisor_log: b.scratch("qemu.log"),
        },
        vec![template_nic()],
        None,
        GuestMemory::TemplateBuild { file: b.memory() },
    );
    let failed = |what: &str, e: &dyn std::error::Error| {
        TemplateError::Build(format!(
            "{what}: {}; last guest console lines:\n{}",
            crate::monitor::error_chain(e),
            husk_hypervisor::log_tail(&spec.console_log, 1500)
        ))
    };
    let mut vm = hv
        .launch(&spec)
        .await
        .map_err(|e| failed("starting the template's VM", &e))?;
    let ready = async {
        let conn = TtrpcConn::connect(&spec.agent_socket).await?;
        let agent = AgentClient::new(std::sync::Arc::new(conn));
        agent
            .handshake(Duration::from_secs(cfg.agent.boot_timeout_secs))
            .await
    };
    let answered = tokio::select! {
        r = ready => r.map(|_| ()),
        exit = vm.wait() => {
            return Err(TemplateError::Build(format!(
                "the template's VM exited while booting ({exit}); last guest console lines:\n{}",
                husk_hypervisor::log_tail(&spec.console_log, 1500)
            )));
        }
    };
    if let Err(e) = answered {
        let _ = vm.shutdown(Duration::from_millis(200)).await;
        return Err(failed("the template's agent did not answer", &e));
    }
    // The connection is closed: let the agent see the host go and wait for
    // the next one, which is every restored sandbox's.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let saved = vm.save_template(&b.state()).await;
    let _ = vm.shutdown(Duration::from_secs(2)).await;
    saved.map_err(|e| failed("saving the template", &e))?;
    tokio::task::spawn_blocking(move || b.finish())
        .await
        .map_err(|e| TemplateError::Build(format!("publishing the template panicked: {e}")))?
}

/// The lock of one key: an exclusive `flock`, released when dropped (also
/// when the process dies).
type KeyLock = nix::fcntl::Flock<fs::File>;

/// Blocks until this process holds an exclusive `flock` on `f` (a build of
/// the same key takes a few seconds; two minutes is a wedged one).
fn lock_exclusive(mut f: fs::File) -> std::io::Result<KeyLock> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                f = back;
                std::thread::sleep(Duration::from_millis(20))
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> Inputs {
        for f in ["qemu", "vmlinux", "initrd.img"] {
            fs::write(dir.join(f), f).unwrap();
        }
        Inputs {
            format: TEMPLATE_FORMAT,
            husk_version: "0.1.0".into(),
            qemu: FileId::of(&dir.join("qemu")).unwrap(),
            kernel: FileId::of(&dir.join("vmlinux")).unwrap(),
            initrd: FileId::of(&dir.join("initrd.img")).unwrap(),
            accel: "tcg".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel_cmdline: "console=ttyS0".into(),
            tcg_tb_size_mib: 0,
            share_tag: "husk-share".into(),
            agent_port: "husk.agent".into(),
        }
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let d = husk_testutil::TempDir::new("template-key");
        let base = inputs(d.path());
        let k = Key::new(base.clone());
        assert_eq!(k.id.len(), 16);
        assert_eq!(k, Key::new(base.clone()), "the key is deterministic");
        let mut changed = Vec::new();
        let mut i = base.clone();
        i.memory_mib = 512;
        changed.push(i);
        let mut i = base.clone();
        i.kernel_cmdline.push_str(" husk.log=debug");
        changed.push(i);
        let mut i = base.clone();
        i.husk_version = "0.2.0".into();
        changed.push(i);
        // A rebuilt initrd (new contents, new mtime and size).
        std::thread::sleep(Duration::from_millis(10));
        fs::write(d.path().join("initrd.img"), "a new agent").unwrap();
        let mut i = base.clone();
        i.initrd = FileId::of(&d.path().join("initrd.img")).unwrap();
        changed.push(i);
        for c in changed {
            assert_ne!(Key::new(c.clone()).id, k.id, "{c:?}");
        }
    }

    #[test]
    fn a_build_is_published_whole_or_not_at_all() {
        let d = husk_testutil::TempDir::new("template-store");
        let store = Store::new(&d.path().join("templates"));
        let key = Key::new(inputs(d.path()));
        // A build that is dropped unfinished leaves nothing.
        match store.lookup(&key).unwrap() {
            Lookup::Build(b) => {
                fs::write(b.memory(), "ram").unwrap();
                assert!(b.dir.exists());
                let dir = b.dir.clone();
                drop(b);
                assert!(!dir.exists());
            }
            Lookup::Ready(_) => panic!("nothing was built"),
        }
        assert!(store.find(&key).is_none());
        assert!(store.list().is_empty());
        // A finished one is found, with its scratch files gone.
        let t = match store.lookup(&key).unwrap() {
            Lookup::Build(b) => {
                fs::write(b.memory(), "ram").unwrap();
                fs::write(b.state(), "devices").unwrap();
                fs::write(b.scratch("qmp.sock"), "").unwrap();
                b.finish().unwrap()
            }
            Lookup::Ready(_) => panic!("nothing was built"),
        };
        assert_eq!(t.id, key.id);
        assert!(!t.dir.join("qmp.sock").exists());
        assert!(store.find(&key).is_some());
        assert!(matches!(store.lookup(&key).unwrap(), Lookup::Ready(_)));
        assert_eq!(store.list().len(), 1);
        // Other inputs: not this template.
        let mut other = key.inputs.clone();
        other.vcpus = 2;
        assert!(store.find(&Key::new(other)).is_none());
        // Removed: gone, and a second remove names the id.
        store.remove(&key.id).unwrap();
        assert!(store.find(&key).is_none());
        let e = store.remove(&key.id).unwrap_err().to_string();
        assert!(
            e.contains(&key.id) && e.contains("husk template show"),
            "{e}"
        );
        assert!(store.remove("../etc").is_err());
    }

    fn build(store: &Store, key: &Key) -> Template {
        match store.lookup(key).unwrap() {
            Lookup::Build(b) => {
                fs::write(b.memory(), "ram").unwrap();
                fs::write(b.state(), "devices").unwrap();
                b.finish().unwrap()
            }
            Lookup::Ready(t) => t,
        }
    }

    #[test]
    fn a_new_initrd_replaces_the_old_template_but_not_other_configurations() {
        let d = husk_testutil::TempDir::new("template-prune");
        let store = Store::new(&d.path().join("templates"));
        let old = Key::new(inputs(d.path()));
        build(&store, &old);
        let mut debug = old.inputs.clone();
        debug.kernel_cmdline.push_str(" husk.log=debug");
        let debug = Key::new(debug);
        build(&store, &debug);
        std::thread::sleep(Duration::from_millis(10));
        fs::write(d.path().join("initrd.img"), "a new agent").unwrap();
        let mut new = old.inputs.clone();
        new.initrd = FileId::of(&d.path().join("initrd.img")).unwrap();
        let new = Key::new(new);
        build(&store, &new);
        assert_eq!(store.prune_replaced_by(&new), vec![old.id.clone()]);
        let mut left: Vec<String> = store.list().into_iter().map(|t| t.id).collect();
        left.sort();
        let mut want = vec![debug.id.clone(), new.id.clone()];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn a_dead_builds_leftovers_are_removed_by_the_next_build() {
        let d = husk_testutil::TempDir::new("template-leftover");
        let store = Store::new(&d.path().join("templates"));
        let key = Key::new(inputs(d.path()));
        let stale = store.root().join(format!("{}.building-1", key.id));
        fs::create_dir_all(&stale).unwrap();
        match store.lookup(&key).unwrap() {
            Lookup::Build(_) => assert!(!stale.exists()),
            Lookup::Ready(_) => panic!("nothing was built"),
        }
    }
}
