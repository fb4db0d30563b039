//! `linux.resources.devices` in cgroup v2: an eBPF program of type
//! `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the container's cgroup, which
//! the kernel runs on every open and mknod of a device node by a process in
//! it (`include/uapi/linux/bpf.h`, `struct bpf_cgroup_dev_ctx`).
//!
//! Semantics follow runc and cgroup v1: a cgroup starts allowing everything,
//! and each rule in order allows or denies its devices, so the last rule
//! that matches a device decides. The program tests the rules last to first
//! and returns at the first match; nothing matching means allowed. As runc
//! does, the devices of `linux.devices` and the standard set every container
//! needs (`/dev/null`, `zero`, `full`, `random`, `urandom`, `tty`,
//! `console`, `ptmx`, `/dev/pts/*`, and mknod of any node) are allowed after
//! the spec's own rules. A spec without device rules gets no program.

use std::path::Path;

use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType};

/// `BPF_DEVCG_DEV_BLOCK` / `BPF_DEVCG_DEV_CHAR`.
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
/// `BPF_DEVCG_ACC_MKNOD` / `_READ` / `_WRITE`.
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One rule, normalised: `None` is a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// [`DEV_CHAR`] or [`DEV_BLOCK`].
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// Bits of [`ACC_MKNOD`], [`ACC_READ`], [`ACC_WRITE`].
    pub access: u32,
}

/// A device rule the spec got wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceRuleError {
    #[error("linux.resources.devices: access {0:?} must be made of r, w and m")]
    BadAccess(String),
    #[error(
        "linux.resources.devices: device type {0:?} cannot be in a device rule; use a, c or b"
    )]
    BadType(String),
    #[error("linux.resources.devices: major/minor {0} is out of range")]
    BadNumber(i64),
}

fn access_bits(access: Option<&str>) -> Result<u32, DeviceRuleError> {
    let Some(text) = access.filter(|a| !a.is_empty()) else {
        return Ok(ACC_ALL);
    };
    let mut bits = 0;
    for c in text.chars() {
        bits |= match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            _ => return Err(DeviceRuleError::BadAccess(text.to_string())),
        };
    }
    Ok(bits)
}

fn number(n: Option<i64>) -> Result<Option<u32>, DeviceRuleError> {
    match n {
        None | Some(-1) => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| DeviceRuleError::BadNumber(v)),
    }
}

fn kind(typ: Option<LinuxDeviceType>) -> Result<Option<u32>, DeviceRuleError> {
    match typ {
        None | Some(LinuxDeviceType::A) => Ok(None),
        Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => Ok(Some(DEV_CHAR)),
        Some(LinuxDeviceType::B) => Ok(Some(DEV_BLOCK)),
        Some(LinuxDeviceType::P) => Err(DeviceRuleError::BadType("p".into())),
    }
}

/// The standard allowances (runc's `AllowedDevices`).
fn standard() -> Vec<Rule> {
    let allow = |kind, major, minor, access| Rule {
        allow: true,
        kind: Some(kind),
        major,
        minor,
        access,
    };
    vec![
        allow(DEV_CHAR, None, None, ACC_MKNOD),
        allow(DEV_BLOCK, None, None, ACC_MKNOD),
        allow(DEV_CHAR, Some(1), Some(3), ACC_ALL), // null
        allow(DEV_CHAR, Some(1), Some(5), ACC_ALL), // zero
        allow(DEV_CHAR, Some(1), Some(7), ACC_ALL), // full
        allow(DEV_CHAR, Some(1), Some(8), ACC_ALL), // random
        allow(DEV_CHAR, Some(1), Some(9), ACC_ALL), // urandom
        allow(DEV_CHAR, Some(5), Some(0), ACC_ALL), // tty
        allow(DEV_CHAR, Some(5), Some(1), ACC_ALL), // console
        allow(DEV_CHAR, Some(5), Some(2), ACC_ALL), // ptmx
        allow(DEV_CHAR, Some(136), None, ACC_ALL),  // /dev/pts/*
    ]
}

/// The rules to enforce for a container, or `None` when its spec has no
/// device rules (everything allowed, no program).
pub fn rules(
    spec_rules: &[LinuxDeviceCgroup],
    devices: &[LinuxDevice],
) -> Result<Option<Vec<Rule>>, DeviceRuleError> {
    if spec_rules.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(spec_rules.len() + devices.len() + 11);
    for r in spec_rules {
        out.push(Rule {
            allow: r.allow(),
            kind: kind(r.typ())?,
            major: number(r.major())?,
            minor: number(r.minor())?,
            access: access_bits(r.access().as_deref())?,
        });
    }
    for d in devices {
        if let Some(kind) = kind(Some(d.typ())).ok().flatten() {
            out.push(Rule {
                allow: true,
                kind: Some(kind),
                major: number(Some(d.major()))?,
                minor: number(Some(d.minor()))?,
                access: ACC_ALL,
            });
        }
    }
    out.extend(standard());
    Ok(Some(out))
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_AND_K: u8 = 0x57;
const ALU64_RSH_K: u8 = 0x77;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_MOV_X: u8 = 0xbf;
const JMP_JNE_K: u8 = 0x55;
const JMP_JNE_X: u8 = 0x5d;
const JMP_EXIT: u8 = 0x95;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The program for `rules`: r2 = type, r3 = access, r4 = major, r5 = minor;
/// one block per rule, last rule first, up to a rule that matches every
/// device; allowed when nothing matches.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU64_MOV_X, 3, 2, 0, 0),
        insn(ALU64_AND_K, 2, 0, 0, 0xffff),
        insn(ALU64_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        // The tests, each jumping past the block when it fails, then the
        // verdict (2 instructions).
        let mut tests: Vec<Insn> = Vec::new();
        if let Some(kind) = rule.kind {
            tests.push(insn(JMP_JNE_K, 2, 0, 0, kind as i32));
        }
        if rule.access != ACC_ALL {
            // The access asked for must be within the rule's.
            tests.push(insn(ALU64_MOV_X, 1, 3, 0, 0));
            tests.push(insn(ALU64_AND_K, 1, 0, 0, rule.access as i32));
            tests.push(insn(JMP_JNE_X, 1, 3, 0, 0));
        }
        if let Some(major) = rule.major {
            tests.push(insn(JMP_JNE_K, 4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            tests.push(insn(JMP_JNE_K, 5, 0, 0, minor as i32));
        }
        let len = tests.len() + 2;
        for (i, t) in tests.iter_mut().enumerate() {
            if t.code == JMP_JNE_K || t.code == JMP_JNE_X {
                t.off = (len - i - 1) as i16;
            }
        }
        let matches_all = tests.is_empty();
        p.extend(tests);
        p.push(insn(ALU64_MOV_K, 0, 0, 0, i32::from(rule.allow)));
        p.push(insn(JMP_EXIT, 0, 0, 0, 0));
        if matches_all {
            // Nothing after it can run, and the verifier refuses
            // unreachable instructions.
            return p;
        }
    }
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

/// Loads the program for `rules` and attaches it to the cgroup at `dir`.
pub fn attach(dir: &Path, rules: &[Rule]) -> std::io::Result<()> {
    let cgroup = std::fs::File::open(dir)?;
    let prog = crate::sys::load_device_program(&program(rules))?;
    crate::sys::attach_device_program(&cgroup, &prog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` on a device access the way the kernel would.
    fn run(prog: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> bool {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads come from the context");
                    r[dst] = u64::from(ctx[(i.off / 4) as usize]);
                }
                ALU64_MOV_X => r[dst] = r[src],
                ALU64_MOV_K => r[dst] = i.imm as u64,
                ALU64_AND_K => r[dst] &= i.imm as u64,
                ALU64_RSH_K => r[dst] >>= i.imm,
                JMP_JNE_K if r[dst] != i.imm as u64 => pc += i.off as usize,
                JMP_JNE_X if r[dst] != r[src] => pc += i.off as usize,
                JMP_JNE_K | JMP_JNE_X => {}
                JMP_EXIT => return r[0] == 1,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn spec_rules(json: serde_json::Value) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn no_rules_no_program() {
        assert_eq!(rules(&[], &[]), Ok(None));
    }

    #[test]
    fn podman_style_deny_all_then_allow() {
        let r = rules(
            &spec_rules(serde_json::json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"},
                {"allow": false, "type": "c", "major": 1, "minor": 3, "access": "w"}
            ])),
            &[],
        )
        .unwrap()
        .unwrap();
        let p = program(&r);
        // Listed: read and write, not mknod (the standard mknod-anything
        // allowance comes after it, so mknod is allowed too).
        assert!(run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 10, 229));
        assert!(run(&p, DEV_CHAR, ACC_MKNOD, 10, 229));
        // Not listed: denied, whatever the access.
        assert!(!run(&p, DEV_CHAR, ACC_READ, 1, 11));
        assert!(!run(&p, DEV_BLOCK, ACC_READ, 8, 0));
        assert!(!run(&p, DEV_CHAR, ACC_WRITE, 10, 230));
        // The standard devices stay usable, even after a rule denying one.
        assert!(run(&p, DEV_CHAR, ACC_WRITE, 1, 3));
        assert!(run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 136, 7));
        assert!(run(&p, DEV_BLOCK, ACC_MKNOD, 8, 0));
    }

    #[test]
    fn later_rules_win_and_access_must_be_covered() {
        let r = rules(
            &spec_rules(serde_json::json!([
                {"allow": false, "type": "c", "major": 4, "access": "rwm"},
                {"allow": true, "type": "c", "major": 4, "minor": 1, "access": "r"}
            ])),
            &[],
        )
        .unwrap()
        .unwrap();
        let p = program(&r);
        assert!(run(&p, DEV_CHAR, ACC_READ, 4, 1));
        assert!(!run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 4, 1));
        assert!(!run(&p, DEV_CHAR, ACC_READ, 4, 2));
        // Rules only about major 4: the rest stays allowed.
        assert!(run(&p, DEV_CHAR, ACC_READ, 5, 5));
        assert!(run(&p, DEV_BLOCK, ACC_READ, 4, 2));
    }

    #[test]
    fn nothing_follows_a_rule_for_every_device() {
        let deny_all = Rule {
            allow: false,
            kind: None,
            major: None,
            minor: None,
            access: ACC_ALL,
        };
        let p = program(&[deny_all]);
        // The prologue, then `r0 = 0; exit`: no unreachable default.
        assert_eq!(p.len(), 8);
        assert!(!run(&p, DEV_CHAR, ACC_READ, 1, 3));
    }

    #[test]
    fn spec_devices_are_allowed() {
        let devices: Vec<LinuxDevice> = serde_json::from_value(serde_json::json!([
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}
        ]))
        .unwrap();
        let r = rules(
            &spec_rules(serde_json::json!([{"allow": false, "access": "rwm"}])),
            &devices,
        )
        .unwrap()
        .unwrap();
        assert!(run(&program(&r), DEV_CHAR, ACC_READ | ACC_WRITE, 10, 229));
    }

    #[test]
    fn bad_rules_are_named() {
        let bad = |json| rules(&spec_rules(json), &[]).unwrap_err().to_string();
        assert!(bad(serde_json::json!([{"allow": true, "access": "rx"}])).contains("\"rx\""));
        assert!(
            bad(serde_json::json!([{"allow": true, "major": 4294967296i64}]))
                .contains("4294967296")
        );
    }
}
