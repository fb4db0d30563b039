//! Spec and annotation loading take what the caller wrote, cut, flipped or
//! random: loading, pod membership, sizing and translation for the guest
//! return a value or an error, never panic, and sizing stays within the
//! configured limits whatever the annotations say (proptest, bounded).

use husk_runtime::bundle::Bundle;
use husk_runtime::config::Config;
use husk_runtime::sizing::{vm_config, Annotations, Host};
use husk_runtime::{pod, translate};
use husk_testutil::TempDir;
use proptest::prelude::*;

fn valid() -> impl Strategy<Value = serde_json::Value> {
    let annotations = prop::collection::btree_map(
        prop_oneof![
            Just("io.kubernetes.cri.sandbox-memory".to_string()),
            Just("io.kubernetes.cri.sandbox-cpu-quota".to_string()),
            Just("io.kubernetes.cri.sandbox-cpu-period".to_string()),
            Just("io.kubernetes.cri.container-type".to_string()),
            Just("io.kubernetes.cri.sandbox-id".to_string()),
            "[a-z./-]{1,20}",
        ],
        prop_oneof![
            "-?[0-9]{1,20}",
            Just("sandbox".to_string()),
            Just("container".to_string()),
            ".{0,12}"
        ],
        0..5,
    );
    let mount = ("(/[a-z.]{1,6}){1,3}", "(/[a-z.]{0,6}){1,3}", any::<bool>()).prop_map(
        |(dst, src, ro)| {
            let mut options = vec!["rbind"];
            if ro {
                options.push("ro");
            }
            serde_json::json!({"destination": dst, "source": src, "type": "bind", "options": options})
        },
    );
    (annotations, prop::collection::vec(mount, 0..3), any::<i64>(), any::<i64>())
        .prop_map(|(annotations, mounts, mem, quota)| {
            serde_json::json!({
                "ociVersion": "1.0.2",
                "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "root": {"path": "rootfs"},
                "annotations": annotations,
                "mounts": mounts,
                "linux": {"resources": {"memory": {"limit": mem}, "cpu": {"quota": quota, "period": 100000}}}
            })
        })
}

fn config_json() -> impl Strategy<Value = Vec<u8>> {
    let text = || valid().prop_map(|v| v.to_string().into_bytes());
    let mutated = (
        text(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    )
        .prop_map(|(mut b, flips)| {
            for (at, x) in flips {
                let i = at.index(b.len());
                b[i] = x;
            }
            b
        });
    let cut =
        (text(), any::<prop::sample::Index>()).prop_map(|(b, at)| b[..at.index(b.len())].to_vec());
    prop_oneof![
        text(),
        mutated,
        cut,
        prop::collection::vec(any::<u8>(), 0..128)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_config_json_loads_sizes_and_translates_or_fails_cleanly(body in config_json()) {
        let dir = TempDir::new("hostile-spec");
        std::fs::create_dir_all(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), &body).unwrap();
        let Ok(bundle) = Bundle::load(dir.path()) else {
            return Ok(());
        };
        let _ = pod::membership(&bundle.spec);
        let _ = pod::pod_id("c1", &bundle.spec);
        let mut cfg = Config::default();
        cfg.limits.max_memory_mib = 4096;
        cfg.limits.max_vcpus = 4;
        let host = Host { cpus: (0..8).collect(), memory_mib: 16384 };
        for a in [Annotations::Honoured, Annotations::Ignored] {
            if let Ok(sized) = vm_config(&cfg, &bundle.spec, &host, a) {
                prop_assert!(sized.hypervisor.memory_mib <= 4096, "{}", sized.hypervisor.memory_mib);
                prop_assert!(sized.hypervisor.vcpus <= 4 && sized.hypervisor.vcpus >= 1);
            }
        }
        let _ = translate::guest_spec(&bundle.spec, "c1", &bundle.dir, &bundle.rootfs);
    }
}
