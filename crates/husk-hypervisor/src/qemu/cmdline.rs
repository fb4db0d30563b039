//! The QEMU command line as a pure function of the [`VmSpec`].
//!
//! Machine: `microvm` with `acpi=off` (no firmware, no PCI scan, direct kernel
//! boot; QEMU then lists the virtio-mmio devices on the kernel command line).
//! Devices: the console on the ISA serial port into a log file, a
//! virtio-serial port for the agent, virtio-rng, and the share (virtio-fs over
//! vhost-user with a shared memfd memory backend, or virtio-9p).
//!
//! QEMU opens no path of the sandbox state dir (which is root's, 0700, and
//! QEMU may run as an unprivileged uid): husk binds the QMP and agent
//! sockets, makes the console socket and connects to virtiofsd, and passes
//! the descriptors at fixed numbers ([`QMP_FD`] ...). QEMU runs under its
//! seccomp sandbox ([`SANDBOX`]).

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;

use crate::{Accel, GuestMemory, SharedFs, VmSpec};

/// QEMU's seccomp sandbox: no obsolete system calls, no set*uid/gid or
/// capability changes, no fork/exec, no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The listening QMP socket QEMU receives.
pub const QMP_FD: RawFd = 3;
/// The listening agent-channel socket QEMU receives.
pub const AGENT_FD: RawFd = 4;
/// The connected socket QEMU writes the guest console into.
pub const CONSOLE_FD: RawFd = 5;
/// The socket connected to virtiofsd (virtio-fs only).
pub const SHARE_FD: RawFd = 6;
/// `/dev/null`, passed only to carry the sandbox's name (`-add-fd ...
/// opaque=<qmp socket path>`), so tools that find a sandbox's processes by
/// its state dir on their command lines still find QEMU.
pub const TAG_FD: RawFd = 7;

/// The tap of the VM's first NIC; NIC `n` gets `NIC_FD + n`.
pub const NIC_FD: RawFd = 8;

/// The template's device state, read by `migrate-incoming fd:` (a VM
/// restored from a template only).
pub const STATE_FD: RawFd = 40;

/// Kernel parameters every husk guest gets. `reboot=t` + QEMU's `-no-reboot`
/// make a guest reboot (the agent's power-off, or a panic via `panic=-1`)
/// end the QEMU process.
pub const BASE_KERNEL_PARAMS: &[&str] = &[
    "console=ttyS0",
    "reboot=t",
    "panic=-1",
    "rdinit=/init",
    "quiet",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
];

fn path_arg(prefix: &str, p: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(p.as_os_str());
    s.push(suffix);
    s
}

/// The kernel command line for `spec`.
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut params: Vec<String> = BASE_KERNEL_PARAMS.iter().map(|s| s.to_string()).collect();
    params.extend(spec.kernel_params.iter().cloned());
    params.join(" ")
}

/// QEMU's arguments (without the binary) for `spec`.
pub fn command_line(spec: &VmSpec) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let memory_object = memory_object(spec);
    let mut push = |s: &str| a.push(OsString::from(s));
    let mem = format!("{}M", spec.memory_mib);

    push("-name");
    push(&format!("husk-{}", spec.name));
    let machine = match memory_object {
        Some(_) => "microvm,acpi=off,memory-backend=mem",
        None => "microvm,acpi=off",
    };
    push("-M");
    push(machine);
    push("-accel");
    push(&match spec.accel {
        Accel::Kvm => "kvm".to_string(),
        Accel::Tcg if spec.tcg_tb_size_mib > 0 => {
            format!("tcg,thread=multi,tb-size={}", spec.tcg_tb_size_mib)
        }
        Accel::Tcg => "tcg,thread=multi".to_string(),
    });
    push("-cpu");
    push(match spec.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    });
    push("-m");
    push(&mem);
    push("-smp");
    push(&spec.vcpus.to_string());
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        // Modern virtio-mmio (vhost-user-fs needs VIRTIO_F_VERSION_1).
        "-global",
        "virtio-mmio.force-legacy=false",
    ] {
        push(s);
    }
    push("-kernel");
    a.push(spec.kernel.clone().into_os_string());
    if let Some(object) = memory_object {
        push_str(&mut a, "-object");
        a.push(object);
    }
    push_str(&mut a, "-initrd");
    a.push(spec.initrd.clone().into_os_string());
    push_str(&mut a, "-append");
    a.push(kernel_cmdline(spec).into());

    push_str(&mut a, "-sandbox");
    push_str(&mut a, SANDBOX);
    push_str(&mut a, "-add-fd");
    a.push(path_arg(
        &format!("fd={TAG_FD},set={TAG_FD},opaque="),
        &spec.qmp_socket,
        "",
    ));

    push_str(&mut a, "-chardev");
    a.push(format!("socket,id=console,fd={CONSOLE_FD}").into());
    push_str(&mut a, "-serial");
    push_str(&mut a, "chardev:console");

    push_str(&mut a, "-device");
    push_str(&mut a, "virtio-rng-device");

    push_str(&mut a, "-device");
    push_str(&mut a, "virtio-serial-device");
    push_str(&mut a, "-chardev");
    a.push(format!("socket,id=agent,fd={AGENT_FD},server=on,wait=off").into());
    push_str(&mut a, "-device");
    a.push(format!("virtserialport,chardev=agent,name={}", spec.agent_port).into());

    match &spec.shared_fs {
        SharedFs::Virtiofs { .. } => {
            push_str(&mut a, "-chardev");
            a.push(format!("socket,id=share,fd={SHARE_FD}").into());
            push_str(&mut a, "-device");
            a.push(format!("vhost-user-fs-device,chardev=share,tag={}", spec.share_tag).into());
        }
        SharedFs::NineP => {
            push_str(&mut a, "-fsdev");
            a.push(path_arg(
                "local,id=share,path=",
                &spec.share_dir,
                ",security_model=none",
            ));
            push_str(&mut a, "-device");
            a.push(format!("virtio-9p-device,fsdev=share,mount_tag={}", spec.share_tag).into());
        }
    }

    for (n, nic) in spec.nics.iter().enumerate() {
        // No vhost-net: these hosts have no /dev/vhost-net, and QEMU (an
        // unprivileged uid) could not open it anyway.
        if nic.tap.is_some() {
            push_str(&mut a, "-netdev");
            a.push(format!("tap,id=net{n},fd={}", NIC_FD + n as RawFd).into());
            push_str(&mut a, "-device");
            a.push(format!("virtio-net-device,netdev=net{n},mac={}", nic.mac_string()).into());
        } else {
            push_str(&mut a, "-device");
            a.push(format!("virtio-net-device,mac={}", nic.mac_string()).into());
        }
    }
    if let GuestMemory::TemplateRestore { .. } = spec.memory {
        // The state is loaded over QMP once `x-ignore-shared` is set
        // (`qemu::restore`), which cannot be set on the command line.
        push_str(&mut a, "-incoming");
        push_str(&mut a, "defer");
    }

    push_str(&mut a, "-chardev");
    a.push(format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off").into());
    push_str(&mut a, "-mon");
    push_str(&mut a, "chardev=qmp,mode=control");
    a
}

/// The `-object` of the guest's RAM when it is not QEMU's anonymous memory:
/// a shared memfd for vhost-user (virtio-fs), or a template's memory file
/// (shared while the template is built, private when restored from it).
fn memory_object(spec: &VmSpec) -> Option<OsString> {
    let size = format!("size={}M", spec.memory_mib);
    match (&spec.memory, &spec.shared_fs) {
        (GuestMemory::TemplateBuild { file }, _) => Some(path_arg(
            "memory-backend-file,id=mem,mem-path=",
            file,
            &format!(",{size},share=on"),
        )),
        (GuestMemory::TemplateRestore { file, .. }, _) => Some(path_arg(
            "memory-backend-file,id=mem,mem-path=",
            file,
            &format!(",{size},share=off"),
        )),
        (GuestMemory::Fresh, SharedFs::Virtiofs { .. }) => {
            Some(format!("memory-backend-memfd,id=mem,{size},share=on").into())
        }
        (GuestMemory::Fresh, SharedFs::NineP) => None,
    }
}

fn push_str(a: &mut Vec<OsString>, s: &str) {
    a.push(OsString::from(s));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(shared_fs: SharedFs, accel: Accel) -> VmSpec {
        let d = PathBuf::from("/run/husk/c1");
        VmSpec {
            name: "c1".into(),
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd.img".into(),
            accel,
            vcpus: 1,
            memory_mib: 256,
            kernel_params: vec!["husk.log=debug".into()],
            share_dir: d.join("share"),
            shared_fs,
            share_tag: "husk-share".into(),
            agent_port: "husk.agent".into(),
            agent_socket: d.join("agent.sock"),
            qmp_socket: d.join("qmp.sock"),
            console_log: d.join("console.log"),
            console_log_limit: 1 << 20,
            uid_pool: None,
            hypervisor_log: d.join("qemu.log"),
            host_cpus: None,
            nics: Vec::new(),
            netns: None,
            memory: GuestMemory::Fresh,
            tcg_tb_size_mib: 0,
        }
    }

    #[test]
    fn a_template_is_built_on_a_shared_file_and_restored_onto_a_private_mapping() {
        let mut s = spec(SharedFs::NineP, Accel::Tcg);
        s.tcg_tb_size_mib = 32;
        s.nics.push(crate::Nic {
            tap: None,
            mac: [2, 0x68, 0x75, 0x73, 0x6b, 1],
        });
        s.memory = GuestMemory::TemplateBuild {
            file: "/var/lib/husk/templates/t/memory".into(),
        };
        let built = joined(&s);
        assert!(
            built.contains("-M microvm,acpi=off,memory-backend=mem "),
            "{built}"
        );
        assert!(
            built.contains("-accel tcg,thread=multi,tb-size=32 "),
            "{built}"
        );
        assert!(built.contains(
            "-object memory-backend-file,id=mem,mem-path=/var/lib/husk/templates/t/memory,size=256M,share=on "
        ), "{built}");
        // The template's NIC has no backend, and it is not waiting for state.
        assert!(
            built.contains("-device virtio-net-device,mac=02:68:75:73:6b:01 "),
            "{built}"
        );
        assert!(
            !built.contains("-netdev") && !built.contains("-incoming"),
            "{built}"
        );

        s.memory = GuestMemory::TemplateRestore {
            file: "/var/lib/husk/templates/t/memory".into(),
            state: "/var/lib/husk/templates/t/state".into(),
        };
        let null = std::sync::Arc::new(std::os::fd::OwnedFd::from(
            std::fs::File::open("/dev/null").unwrap(),
        ));
        s.nics[0].tap = Some(null);
        let restored = joined(&s);
        assert!(restored.contains(
            "-object memory-backend-file,id=mem,mem-path=/var/lib/husk/templates/t/memory,size=256M,share=off "
        ), "{restored}");
        assert!(restored.contains(
            "-netdev tap,id=net0,fd=8 -device virtio-net-device,netdev=net0,mac=02:68:75:73:6b:01 "
        ), "{restored}");
        assert!(restored.contains(" -incoming defer "), "{restored}");
        // Everything but the memory's sharing, the NIC's backend and the
        // incoming state is the template's: the restore must match it.
        let strip = |l: &str| {
            l.replace(",share=off", ",share=on")
                .replace("-incoming defer ", "")
                .replace("-netdev tap,id=net0,fd=8 ", "")
                .replace("netdev=net0,", "")
        };
        assert_eq!(strip(&restored), strip(&built));
    }

    #[test]
    fn each_nic_is_a_tap_fd_and_a_virtio_net_device_with_its_mac() {
        let mut s = spec(SharedFs::NineP, Accel::Tcg);
        let null = std::sync::Arc::new(std::os::fd::OwnedFd::from(
            std::fs::File::open("/dev/null").unwrap(),
        ));
        for mac in [[0x0a, 0x58, 0x0a, 0x58, 0, 5], [2, 0, 0, 0, 0, 9]] {
            s.nics.push(crate::Nic {
                tap: Some(null.clone()),
                mac,
            });
        }
        let a = joined(&s);
        assert!(a.contains(
            "-netdev tap,id=net0,fd=8 -device virtio-net-device,netdev=net0,mac=0a:58:0a:58:00:05 \
             -netdev tap,id=net1,fd=9 -device virtio-net-device,netdev=net1,mac=02:00:00:00:00:09"
        ), "{a}");
        // No NIC without taps.
        assert!(!joined(&spec(SharedFs::NineP, Accel::Tcg)).contains("-netdev"));
    }

    fn joined(spec: &VmSpec) -> String {
        command_line(spec)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn golden_9p_tcg() {
        assert_eq!(
            joined(&spec(SharedFs::NineP, Accel::Tcg)),
            "-name husk-c1 -M microvm,acpi=off -accel tcg,thread=multi -cpu max -m 256M -smp 1 \
             -nodefaults -no-user-config -display none -no-reboot -global virtio-mmio.force-legacy=false \
             -kernel /k/vmlinux -initrd /k/initrd.img \
             -append console=ttyS0 reboot=t panic=-1 rdinit=/init quiet i8042.noaux i8042.nomux i8042.dumbkbd 8250.nr_uarts=1 husk.log=debug \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -add-fd fd=7,set=7,opaque=/run/husk/c1/qmp.sock \
             -chardev socket,id=console,fd=5 -serial chardev:console \
             -device virtio-rng-device -device virtio-serial-device \
             -chardev socket,id=agent,fd=4,server=on,wait=off \
             -device virtserialport,chardev=agent,name=husk.agent \
             -fsdev local,id=share,path=/run/husk/c1/share,security_model=none \
             -device virtio-9p-device,fsdev=share,mount_tag=husk-share \
             -chardev socket,id=qmp,fd=3,server=on,wait=off -mon chardev=qmp,mode=control"
        );
    }

    #[test]
    fn virtiofs_uses_shared_memfd_and_vhost_user() {
        let s = spec(
            SharedFs::Virtiofs {
                daemon: "/usr/libexec/virtiofsd".into(),
                socket: "/run/husk/c1/virtiofsd.sock".into(),
            },
            Accel::Kvm,
        );
        let line = joined(&s);
        assert!(line.contains("-M microvm,acpi=off,memory-backend=mem "));
        assert!(line.contains("-object memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(line.contains(
            "-chardev socket,id=share,fd=6 -device vhost-user-fs-device,chardev=share,tag=husk-share"
        ));
        assert!(line.contains("-accel kvm -cpu host"));
        assert!(!line.contains("9p"));
    }

    #[test]
    fn qemu_runs_under_its_seccomp_sandbox_and_opens_no_state_path() {
        for fs in [
            SharedFs::NineP,
            SharedFs::Virtiofs {
                daemon: "/usr/libexec/virtiofsd".into(),
                socket: "/run/husk/c1/virtiofsd.sock".into(),
            },
        ] {
            let line = joined(&spec(fs, Accel::Tcg));
            assert!(line.contains(
                " -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny "
            ));
            // The state dir appears only in the fd set's label.
            assert_eq!(
                line.matches("/run/husk/c1/").count() - line.matches("/run/husk/c1/share").count(),
                1,
                "{line}"
            );
            assert!(
                !line.contains("console.log") && !line.contains("agent.sock"),
                "{line}"
            );
        }
    }

    #[test]
    fn kernel_params_come_after_the_base_ones() {
        let s = spec(SharedFs::NineP, Accel::Tcg);
        let c = kernel_cmdline(&s);
        assert!(c.starts_with("console=ttyS0 "));
        assert!(c.ends_with(" husk.log=debug"));
    }
}
