//! `linux.seccomp` compiled to a classic BPF program, in the agent (pure, so
//! profiles and every operator are unit-tested by running the program in a
//! small BPF interpreter), and installed by the init or exec stage as the
//! last step before `execve`.
//!
//! The program: check the architecture (x86_64 only: anything else, and the
//! x32 ABI, kills the process, so an `SCMP_ARCH_X86` entry can never allow
//! an i386 system call), then compare the system call number against every
//! named call and jump to that call's rules; a rule returns its action when
//! all its argument conditions hold (64-bit unsigned comparisons, as
//! libseccomp does); when none applies, the default action. Like runc:
//! names unknown to the x86_64 table are skipped (logged), rules whose
//! action is the default action are dropped, and one call's several
//! conditions on the same argument become separate (OR-ed) rules. Rules
//! with conditions are tried before a call's unconditional rule.

pub mod syscalls;

use std::collections::BTreeMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use serde::{Deserialize, Serialize};

use crate::sys::SockFilter;

/// A profile the agent cannot compile.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SeccompError {
    /// `SCMP_ACT_NOTIFY` needs a seccomp agent on the host.
    #[error("linux.seccomp uses SCMP_ACT_NOTIFY, which needs a seccomp agent; husk has none, use another action")]
    Notify,
    /// An argument index outside 0..=5.
    #[error("linux.seccomp rule for {syscall} checks argument {index}; system calls have arguments 0 to 5")]
    BadArgIndex {
        /// The call.
        syscall: String,
        /// The index.
        index: usize,
    },
    /// The program is longer than the kernel takes.
    #[error("linux.seccomp compiles to {0} BPF instructions, more than the kernel's limit of 4096; simplify the profile")]
    TooLong(usize),
    /// A jump of a rule does not fit (cannot happen with at most six conditions).
    #[error("linux.seccomp rule for {0} is too complex to compile")]
    TooComplex(String),
}

/// A compiled filter and the flags to install it with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompProgram {
    /// `SECCOMP_FILTER_FLAG_*` bits.
    pub flags: u32,
    /// The BPF program; in JSON (the stages' instructions) one hex string
    /// of the kernel's `struct sock_filter` layout: a thousand-instruction
    /// profile as an array of objects cost the init stage milliseconds of
    /// parsing under TCG.
    #[serde(with = "filter_hex")]
    pub filter: Vec<SockFilter>,
}

/// `Vec<SockFilter>` as a hex string: per instruction `code` (2 bytes),
/// `jt`, `jf`, `k` (4 bytes), little-endian, as the kernel lays it out.
mod filter_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::SockFilter;

    const HEX: &[u8; 16] = b"0123456789abcdef";

    pub fn serialize<S: Serializer>(filter: &[SockFilter], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(filter.len() * 16);
        for insn in filter {
            let mut bytes = [0u8; 8];
            bytes[..2].copy_from_slice(&insn.code.to_le_bytes());
            bytes[2] = insn.jt;
            bytes[3] = insn.jf;
            bytes[4..].copy_from_slice(&insn.k.to_le_bytes());
            for b in bytes {
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
            }
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SockFilter>, D::Error> {
        let text = <&str>::deserialize(d)?;
        let bad =
            || serde::de::Error::custom("a seccomp filter must be hex, 16 digits per instruction");
        if text.len() % 16 != 0 {
            return Err(bad());
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(bad()),
        };
        let mut filter = Vec::with_capacity(text.len() / 16);
        for chunk in text.as_bytes().chunks_exact(16) {
            let mut bytes = [0u8; 8];
            for (i, pair) in chunk.chunks_exact(2).enumerate() {
                bytes[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
            }
            filter.push(SockFilter {
                code: u16::from_le_bytes([bytes[0], bytes[1]]),
                jt: bytes[2],
                jf: bytes[3],
                k: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            });
        }
        Ok(filter)
    }
}

/// `SECCOMP_RET_*` values.
pub mod ret {
    /// Kill the process.
    pub const KILL_PROCESS: u32 = 0x8000_0000;
    /// Kill the thread.
    pub const KILL_THREAD: u32 = 0x0000_0000;
    /// SIGSYS.
    pub const TRAP: u32 = 0x0003_0000;
    /// Fail with an errno (low 16 bits).
    pub const ERRNO: u32 = 0x0005_0000;
    /// Notify a tracer (low 16 bits are the message); ENOSYS without one.
    pub const TRACE: u32 = 0x7ff0_0000;
    /// Allow and log.
    pub const LOG: u32 = 0x7ffc_0000;
    /// Allow.
    pub const ALLOW: u32 = 0x7fff_0000;
}

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The bit that marks x32 system calls on x86_64.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const SECCOMP_FILTER_FLAG_TSYNC: u32 = 1;
const SECCOMP_FILTER_FLAG_LOG: u32 = 2;
const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 4;
const BPF_MAXINSNS: usize = 4096;

// Classic BPF opcodes.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_RET_K: u16 = 0x06;

/// Offsets in `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
fn offset_arg(index: usize, high: bool) -> u32 {
    16 + 8 * index as u32 + if high { 4 } else { 0 }
}

fn action_value(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    let errno = errno.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => ret::KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => ret::KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => ret::TRAP,
        LinuxSeccompAction::ScmpActErrno => ret::ERRNO | errno,
        LinuxSeccompAction::ScmpActTrace => ret::TRACE | errno,
        LinuxSeccompAction::ScmpActLog => ret::LOG,
        LinuxSeccompAction::ScmpActAllow => ret::ALLOW,
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Notify),
    })
}

/// One argument condition.
#[derive(Clone, Copy, Debug)]
struct Condition {
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: u64,
}

#[derive(Clone, Debug)]
struct Rule {
    conditions: Vec<Condition>,
    action: u32,
}

/// One system call's number, name and rules.
type Call = (u32, String, Vec<Rule>);

type Label = usize;

enum Op {
    Load(u32),
    And(u32),
    Ret(u32),
    Jump {
        code: u16,
        k: u32,
        jt: Label,
        jf: Label,
    },
    /// Unconditional jump (32-bit offset).
    Ja(Label),
    Mark(Label),
}

struct Assembler {
    ops: Vec<Op>,
    labels: usize,
}

impl Assembler {
    fn label(&mut self) -> Label {
        self.labels += 1;
        self.labels - 1
    }

    fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    fn jump(&mut self, code: u16, k: u32, jt: Label, jf: Label) {
        self.push(Op::Jump { code, k, jt, jf });
    }

    fn finish(self, what: impl Fn() -> String) -> Result<Vec<SockFilter>, SeccompError> {
        let mut positions = vec![usize::MAX; self.labels];
        let mut pos = 0;
        for op in &self.ops {
            match op {
                Op::Mark(label) => positions[*label] = pos,
                _ => pos += 1,
            }
        }
        let mut out = Vec::with_capacity(pos);
        for op in &self.ops {
            let here = out.len();
            let offset = |label: Label| positions[label] - here - 1;
            let insn = match *op {
                Op::Mark(_) => continue,
                Op::Load(k) => SockFilter {
                    code: BPF_LD_W_ABS,
                    jt: 0,
                    jf: 0,
                    k,
                },
                Op::And(k) => SockFilter {
                    code: BPF_ALU_AND_K,
                    jt: 0,
                    jf: 0,
                    k,
                },
                Op::Ret(k) => SockFilter {
                    code: BPF_RET_K,
                    jt: 0,
                    jf: 0,
                    k,
                },
                Op::Ja(label) => SockFilter {
                    code: BPF_JMP_JA,
                    jt: 0,
                    jf: 0,
                    k: offset(label) as u32,
                },
                Op::Jump { code, k, jt, jf } => {
                    let (jt, jf) = (offset(jt), offset(jf));
                    if jt > 255 || jf > 255 {
                        return Err(SeccompError::TooComplex(what()));
                    }
                    SockFilter {
                        code,
                        jt: jt as u8,
                        jf: jf as u8,
                        k,
                    }
                }
            };
            out.push(insn);
        }
        Ok(out)
    }

    /// Emits the checks of one condition: falls through when it holds,
    /// jumps to `fail` otherwise.
    fn condition(&mut self, c: &Condition, fail: Label) {
        let pass = self.label();
        let hi = |v: u64| (v >> 32) as u32;
        let lo = |v: u64| v as u32;
        let (v, hi_off, lo_off) = (
            c.value,
            offset_arg(c.index, true),
            offset_arg(c.index, false),
        );
        let next = self.label();
        match c.op {
            LinuxSeccompOperator::ScmpCmpEq => {
                self.push(Op::Load(hi_off));
                self.jump(BPF_JMP_JEQ_K, hi(v), next, fail);
                self.push(Op::Mark(next));
                self.push(Op::Load(lo_off));
                self.jump(BPF_JMP_JEQ_K, lo(v), pass, fail);
            }
            LinuxSeccompOperator::ScmpCmpNe => {
                self.push(Op::Load(hi_off));
                self.jump(BPF_JMP_JEQ_K, hi(v), next, pass);
                self.push(Op::Mark(next));
                self.push(Op::Load(lo_off));
                self.jump(BPF_JMP_JEQ_K, lo(v), fail, pass);
            }
            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                // OCI: value is the mask, valueTwo the datum.
                let (mask, datum) = (c.value, c.value_two);
                self.push(Op::Load(hi_off));
                self.push(Op::And(hi(mask)));
                self.jump(BPF_JMP_JEQ_K, hi(datum), next, fail);
                self.push(Op::Mark(next));
                self.push(Op::Load(lo_off));
                self.push(Op::And(lo(mask)));
                self.jump(BPF_JMP_JEQ_K, lo(datum), pass, fail);
            }
            op => {
                // Ordered comparisons: decided by the high words unless they
                // are equal, then by the low words.
                let (greater, less, low_code, low_true, low_false) = match op {
                    LinuxSeccompOperator::ScmpCmpGt => (pass, fail, BPF_JMP_JGT_K, pass, fail),
                    LinuxSeccompOperator::ScmpCmpGe => (pass, fail, BPF_JMP_JGE_K, pass, fail),
                    LinuxSeccompOperator::ScmpCmpLt => (fail, pass, BPF_JMP_JGE_K, fail, pass),
                    // ScmpCmpLe
                    _ => (fail, pass, BPF_JMP_JGT_K, fail, pass),
                };
                let equal_high = self.label();
                self.push(Op::Load(hi_off));
                self.jump(BPF_JMP_JGT_K, hi(v), greater, next);
                self.push(Op::Mark(next));
                self.jump(BPF_JMP_JEQ_K, hi(v), equal_high, less);
                self.push(Op::Mark(equal_high));
                self.push(Op::Load(lo_off));
                self.jump(low_code, lo(v), low_true, low_false);
            }
        }
        self.push(Op::Mark(pass));
    }
}

/// Flags of the profile, and notes about those that were left out.
fn flags_of(seccomp: &LinuxSeccomp, notes: &mut Vec<String>) -> u32 {
    let mut flags = 0;
    for flag in seccomp.flags().iter().flatten() {
        match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => flags |= SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => flags |= SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                flags |= SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            other => notes.push(format!(
                "seccomp flag {other} ignored (it needs a notify agent)"
            )),
        }
    }
    flags
}

fn rules_of(name: &str, args: &[LinuxSeccompArg], action: u32) -> Result<Vec<Rule>, SeccompError> {
    let mut conditions = Vec::with_capacity(args.len());
    for arg in args {
        if arg.index() > 5 {
            return Err(SeccompError::BadArgIndex {
                syscall: name.to_string(),
                index: arg.index(),
            });
        }
        conditions.push(Condition {
            index: arg.index(),
            op: arg.op(),
            value: arg.value(),
            value_two: arg.value_two().unwrap_or(0),
        });
    }
    let mut indexes: Vec<usize> = conditions.iter().map(|c| c.index).collect();
    indexes.sort_unstable();
    let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
    Ok(if repeated {
        // runc: several conditions on one argument are alternatives.
        conditions
            .into_iter()
            .map(|c| Rule {
                conditions: vec![c],
                action,
            })
            .collect()
    } else {
        vec![Rule { conditions, action }]
    })
}

/// Compiles a profile; returns the program and notes (skipped names and
/// architectures) for the log.
pub fn compile(seccomp: &LinuxSeccomp) -> Result<(SeccompProgram, Vec<String>), SeccompError> {
    let mut notes = Vec::new();
    let default = action_value(seccomp.default_action(), seccomp.default_errno_ret())?;
    let flags = flags_of(seccomp, &mut notes);
    for arch in seccomp.architectures().iter().flatten() {
        match arch {
            Arch::ScmpArchNative | Arch::ScmpArchX86_64 => {}
            other => notes.push(format!(
                "seccomp architecture {other} left out: the guest runs x86_64 only, and system calls of any other ABI are killed"
            )),
        }
    }

    // Rules per system call number, in profile order; the order of first
    // appearance decides the dispatch order.
    let mut rules: BTreeMap<u32, (usize, String, Vec<Rule>)> = BTreeMap::new();
    let mut unknown = Vec::new();
    for entry in seccomp.syscalls().iter().flatten() {
        let action = action_value(entry.action(), entry.errno_ret())?;
        if action == default {
            continue;
        }
        let args = entry.args().clone().unwrap_or_default();
        for name in entry.names() {
            let Some(nr) = syscalls::number(name) else {
                unknown.push(name.clone());
                continue;
            };
            let new = rules_of(name, &args, action)?;
            let order = rules.len();
            let slot = rules
                .entry(nr)
                .or_insert_with(|| (order, name.clone(), Vec::new()));
            slot.2.extend(new);
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        notes.push(format!(
            "seccomp: system calls unknown on x86_64 skipped: {}",
            unknown.join(", ")
        ));
    }
    let mut ordered: Vec<(usize, Call)> = rules
        .into_iter()
        .map(|(nr, (order, name, rules))| (order, (nr, name, rules)))
        .collect();
    ordered.sort_by_key(|(order, _)| *order);
    let mut calls: Vec<Call> = ordered.into_iter().map(|(_, call)| call).collect();
    for (_, _, call_rules) in &mut calls {
        // Conditional rules first; a stable sort keeps profile order.
        call_rules.sort_by_key(|r| r.conditions.is_empty());
    }

    let mut asm = Assembler {
        ops: Vec::new(),
        labels: 0,
    };
    let arch_ok = asm.label();
    let bad_arch = asm.label();
    asm.push(Op::Load(OFFSET_ARCH));
    asm.jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, arch_ok, bad_arch);
    asm.push(Op::Mark(bad_arch));
    asm.push(Op::Ret(ret::KILL_PROCESS));
    asm.push(Op::Mark(arch_ok));
    asm.push(Op::Load(OFFSET_NR));
    let native = asm.label();
    let x32 = asm.label();
    asm.jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, x32, native);
    asm.push(Op::Mark(x32));
    asm.push(Op::Ret(ret::KILL_PROCESS));
    asm.push(Op::Mark(native));
    let bodies: Vec<Label> = calls.iter().map(|_| asm.label()).collect();
    for ((nr, _, _), &body) in calls.iter().zip(&bodies) {
        let (hit, miss) = (asm.label(), asm.label());
        asm.jump(BPF_JMP_JEQ_K, *nr, hit, miss);
        asm.push(Op::Mark(hit));
        asm.push(Op::Ja(body));
        asm.push(Op::Mark(miss));
    }
    asm.push(Op::Ret(default));
    for ((_, _, call_rules), &body) in calls.iter().zip(&bodies) {
        asm.push(Op::Mark(body));
        for rule in call_rules {
            let next = asm.label();
            for condition in &rule.conditions {
                asm.condition(condition, next);
            }
            asm.push(Op::Ret(rule.action));
            asm.push(Op::Mark(next));
        }
        asm.push(Op::Ret(default));
    }
    let names: Vec<String> = calls.iter().map(|(_, n, _)| n.clone()).collect();
    let filter = asm.finish(|| names.join(", "))?;
    if filter.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong(filter.len()));
    }
    Ok((SeccompProgram { flags, filter }, notes))
}

#[cfg(test)]
mod tests;
