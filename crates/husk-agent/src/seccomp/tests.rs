//! The compiled programs, run in a minimal classic-BPF interpreter.

use super::*;
use serde_json::json;

/// Runs `program` on a `seccomp_data` and returns the action.
fn run(program: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&nr.to_le_bytes());
    data.extend_from_slice(&arch.to_le_bytes());
    data.extend_from_slice(&0u64.to_le_bytes());
    for arg in args {
        data.extend_from_slice(&arg.to_le_bytes());
    }
    let mut a: u32 = 0;
    let mut pc = 0usize;
    for _ in 0..100_000 {
        let insn = program[pc];
        pc += 1;
        match insn.code {
            BPF_LD_W_ABS => {
                let k = insn.k as usize;
                a = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
            }
            BPF_ALU_AND_K => a &= insn.k,
            BPF_RET_K => return insn.k,
            BPF_JMP_JA => pc += insn.k as usize,
            code => {
                let taken = match code {
                    BPF_JMP_JEQ_K => a == insn.k,
                    BPF_JMP_JGT_K => a > insn.k,
                    BPF_JMP_JGE_K => a >= insn.k,
                    other => panic!("unexpected opcode {other:#x}"),
                };
                pc += if taken { insn.jt } else { insn.jf } as usize;
            }
        }
    }
    panic!("the program does not terminate");
}

fn profile(value: serde_json::Value) -> LinuxSeccomp {
    serde_json::from_value(value).unwrap()
}

fn nr(name: &str) -> u32 {
    syscalls::number(name).unwrap()
}

fn call(program: &SeccompProgram, name: &str, args: [u64; 6]) -> u32 {
    run(&program.filter, AUDIT_ARCH_X86_64, nr(name), args)
}

const EPERM: u32 = ret::ERRNO | 1;

#[test]
fn allow_list_with_errno_default() {
    let (program, notes) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["read", "write", "exit_group", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
        ]
    })))
    .unwrap();
    assert_eq!(call(&program, "read", [0; 6]), ret::ALLOW);
    assert_eq!(call(&program, "exit_group", [0; 6]), ret::ALLOW);
    assert_eq!(call(&program, "mkdir", [0; 6]), ret::ERRNO | 38);
    assert_eq!(call(&program, "open", [0; 6]), EPERM);
    assert!(
        notes.iter().any(|n| n.contains("no_such_syscall")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("SCMP_ARCH_X86")),
        "{notes:?}"
    );
}

#[test]
fn other_architectures_and_x32_are_killed() {
    let (program, _) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]
    })))
    .unwrap();
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    // i386 read (3) is not allowed even though the default is ALLOW.
    assert_eq!(
        run(&program.filter, AUDIT_ARCH_I386, 3, [0; 6]),
        ret::KILL_PROCESS
    );
    assert_eq!(
        run(
            &program.filter,
            AUDIT_ARCH_X86_64,
            X32_SYSCALL_BIT | 83,
            [0; 6]
        ),
        ret::KILL_PROCESS
    );
    assert_eq!(call(&program, "getpid", [0; 6]), ret::ALLOW);
    assert_eq!(call(&program, "mkdir", [0; 6]), EPERM);
}

#[test]
fn every_action() {
    let (program, _) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_KILL_PROCESS",
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["write"], "action": "SCMP_ACT_LOG"},
            {"names": ["open"], "action": "SCMP_ACT_TRAP"},
            {"names": ["close"], "action": "SCMP_ACT_KILL"},
            {"names": ["stat"], "action": "SCMP_ACT_KILL_THREAD"},
            {"names": ["fstat"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
            {"names": ["lstat"], "action": "SCMP_ACT_ERRNO"}
        ]
    })))
    .unwrap();
    assert_eq!(call(&program, "read", [0; 6]), ret::ALLOW);
    assert_eq!(call(&program, "write", [0; 6]), ret::LOG);
    assert_eq!(call(&program, "open", [0; 6]), ret::TRAP);
    assert_eq!(call(&program, "close", [0; 6]), ret::KILL_THREAD);
    assert_eq!(call(&program, "stat", [0; 6]), ret::KILL_THREAD);
    assert_eq!(call(&program, "fstat", [0; 6]), ret::TRACE | 7);
    assert_eq!(call(&program, "lstat", [0; 6]), EPERM);
    assert_eq!(call(&program, "getpid", [0; 6]), ret::KILL_PROCESS);
}

#[test]
fn default_errno_ret() {
    let (program, _) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]
    })))
    .unwrap();
    assert_eq!(call(&program, "write", [0; 6]), ret::ERRNO | 38);
}

/// A profile allowing `personality` only when argument 1 compares with
/// `value` by `op`.
fn compare(op: &str, value: u64, value_two: u64) -> SeccompProgram {
    compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 1, "value": value, "valueTwo": value_two, "op": op}]}]
    })))
    .unwrap()
    .0
}

fn allowed(program: &SeccompProgram, arg: u64) -> bool {
    let mut args = [0; 6];
    args[1] = arg;
    call(program, "personality", args) == ret::ALLOW
}

#[test]
fn every_operator_on_64_bit_values() {
    let samples: Vec<u64> = vec![
        0,
        1,
        5,
        0xffff_ffff,
        0x1_0000_0000,
        0x1_0000_0005,
        0x2_0000_0000,
        u64::MAX - 1,
        u64::MAX,
    ];
    let values = [0u64, 5, 0xffff_ffff, 0x1_0000_0000, 0x1_0000_0005, u64::MAX];
    type Op = fn(u64, u64) -> bool;
    let ops: [(&str, Op); 6] = [
        ("SCMP_CMP_EQ", |a, v| a == v),
        ("SCMP_CMP_NE", |a, v| a != v),
        ("SCMP_CMP_LT", |a, v| a < v),
        ("SCMP_CMP_LE", |a, v| a <= v),
        ("SCMP_CMP_GT", |a, v| a > v),
        ("SCMP_CMP_GE", |a, v| a >= v),
    ];
    for (name, expected) in ops {
        for &value in &values {
            let program = compare(name, value, 0);
            for &arg in &samples {
                assert_eq!(
                    allowed(&program, arg),
                    expected(arg, value),
                    "{name} arg {arg:#x} value {value:#x}"
                );
            }
        }
    }
}

#[test]
fn masked_eq() {
    // (arg & 0xff00000000ff) == 0x120000000034
    let program = compare("SCMP_CMP_MASKED_EQ", 0xff00_0000_00ff, 0x1200_0000_0034);
    assert!(allowed(&program, 0x1200_0000_0034));
    assert!(allowed(&program, 0x12ff_ffff_ff34));
    assert!(!allowed(&program, 0x1300_0000_0034));
    assert!(!allowed(&program, 0x1200_0000_0035));
    // The docker profile's clone rule: no namespace flags.
    let program = compare("SCMP_CMP_MASKED_EQ", 0x7e02_0000, 0);
    assert!(allowed(&program, 0x0001_1200));
    assert!(!allowed(&program, 0x1000_0000)); // CLONE_NEWUSER
}

#[test]
fn conditions_on_different_arguments_are_anded_and_on_one_argument_ored() {
    let (program, _) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_EQ"},
                      {"index": 1, "value": 1, "op": "SCMP_CMP_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}
        ]
    })))
    .unwrap();
    assert_eq!(call(&program, "socket", [2, 1, 0, 0, 0, 0]), ret::ALLOW);
    assert_eq!(call(&program, "socket", [2, 2, 0, 0, 0, 0]), EPERM);
    assert_eq!(call(&program, "socket", [10, 1, 0, 0, 0, 0]), EPERM);
    assert_eq!(call(&program, "personality", [0; 6]), ret::ALLOW);
    assert_eq!(
        call(&program, "personality", [8, 0, 0, 0, 0, 0]),
        ret::ALLOW
    );
    assert_eq!(call(&program, "personality", [9, 0, 0, 0, 0, 0]), EPERM);
}

#[test]
fn several_entries_for_one_call_and_conditional_rules_first() {
    let (program, _) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["kill"], "action": "SCMP_ACT_LOG",
             "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]}
        ]
    })))
    .unwrap();
    assert_eq!(call(&program, "kill", [1, 0, 0, 0, 0, 0]), ret::LOG);
    assert_eq!(call(&program, "kill", [1, 9, 0, 0, 0, 0]), ret::ERRNO | 13);
}

#[test]
fn flags_and_errors() {
    let (program, notes) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                  "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]
    })))
    .unwrap();
    assert_eq!(program.flags, 7);
    assert!(notes.is_empty());
    assert_eq!(
        compile(&profile(json!({"defaultAction": "SCMP_ACT_NOTIFY"}))).unwrap_err(),
        SeccompError::Notify
    );
    let error = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                      "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]
    })))
    .unwrap_err();
    assert!(matches!(error, SeccompError::BadArgIndex { index: 6, .. }));
}

#[test]
fn podman_default_profile_compiles_and_behaves() {
    let json = include_str!("testdata/podman-default.json");
    let seccomp: LinuxSeccomp = serde_json::from_str(json).unwrap();
    let (program, _notes) = compile(&seccomp).unwrap();
    assert!(program.filter.len() < BPF_MAXINSNS);
    for ok in [
        "read",
        "write",
        "openat",
        "execve",
        "clone",
        "clone3",
        "mkdir",
        "exit_group",
    ] {
        assert_eq!(call(&program, ok, [0; 6]), ret::ALLOW, "{ok}");
    }
    // This containers-common profile allows unshare and keyctl (user
    // namespaces are unprivileged there) but refuses what needs privileges.
    for refused in [
        "kexec_load",
        "open_by_handle_at",
        "bpf",
        "init_module",
        "acct",
        "iopl",
    ] {
        assert_eq!(call(&program, refused, [0; 6]), EPERM, "{refused}");
    }
    // socket(AF_NETLINK, *, NETLINK_AUDIT) fails with EINVAL; others pass.
    assert_eq!(
        call(&program, "socket", [16, 3, 9, 0, 0, 0]),
        ret::ERRNO | 22
    );
    assert_eq!(call(&program, "socket", [2, 1, 0, 0, 0, 0]), ret::ALLOW);
    // Calls the profile does not name fail with ENOSYS (defaultErrnoRet).
    assert_eq!(call(&program, "add_key", [0; 6]), ret::ERRNO | 38);
}

#[test]
fn programs_cross_to_the_stages_as_hex() {
    let (program, _) = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]
    })))
    .unwrap();
    let text = serde_json::to_string(&program).unwrap();
    let hex = serde_json::from_str::<serde_json::Value>(&text).unwrap()["filter"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(hex.len(), program.filter.len() * 16);
    // The first instruction loads the architecture: BPF_LD|BPF_W|BPF_ABS
    // (0x20) at offset 4 of seccomp_data.
    assert_eq!(&hex[..16], "2000000004000000");
    let back: SeccompProgram = serde_json::from_str(&text).unwrap();
    assert_eq!(back, program);
    for bad in [
        r#"{"flags":0,"filter":"20000000"}"#,
        r#"{"flags":0,"filter":"2000000004000x00"}"#,
    ] {
        assert!(
            serde_json::from_str::<SeccompProgram>(bad).is_err(),
            "{bad}"
        );
    }
}
