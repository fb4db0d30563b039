//! The host side of the sandbox network on a real network namespace (needs
//! root, no VM): `cargo test -p husk-runtime --features root-tests --test
//! net_root`. Each test makes its own namespace with a veth pair, as a
//! bridge network or CNI would, and checks what `HostNetwork` made there
//! and that it leaves nothing.

use husk_runtime::net::HostNetwork;
use husk_testutil::netns::TestNetns;

/// A veth `name` in `ns` whose peer is in `peer` (the bridge's side).
fn veth(ns: &TestNetns, peer: &TestNetns, name: &str) {
    ns.sh(&format!(
        "ip link add {name} type veth peer name p-{name} netns {} && ip link set {name} up",
        peer.name()
    ));
    peer.sh(&format!("ip link set p-{name} up"));
}

/// A namespace whose `eth0` looks like a CNI bridge network's: an address,
/// a default route, a permanent neighbour, MTU 1400; and its peer's.
fn cni_like(tag: &str) -> (TestNetns, TestNetns) {
    husk_testutil::require_root("the network root tests");
    let ns = TestNetns::new(tag);
    let peer = TestNetns::new(&format!("{tag}-peer"));
    veth(&ns, &peer, "eth0");
    ns.sh("ip link set eth0 mtu 1400 address 0a:58:0a:58:00:05 up && \
         ip addr add 10.88.0.5/16 dev eth0 && ip addr add fd00:88::5/64 dev eth0 nodad && \
         ip route add default via 10.88.0.1 dev eth0 && \
         ip route add 192.168.7.0/24 dev eth0 && \
         ip neigh add 10.88.0.9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent");
    (ns, peer)
}

#[test]
fn root_each_interface_gets_a_tap_joined_both_ways_and_the_guest_its_config() {
    let (ns, _peer) = cni_like("join");
    let (mut net, guest) = HostNetwork::attach(&ns.path(), false).unwrap();

    // One tap, with the interface's MTU, up; the NIC gets eth0's MAC.
    let nics = net.nics();
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].mac_string(), "0a:58:0a:58:00:05");
    let tap = ns.sh("ip -o link show husktap0");
    assert!(tap.contains("mtu 1400"), "{tap}");
    // Redirects both ways, on ingress qdiscs.
    for (from, to) in [("eth0", "husktap0"), ("husktap0", "eth0")] {
        let f = ns.sh(&format!("tc filter show dev {from} ingress"));
        assert!(
            f.contains(&format!("Egress Redirect to device {to}")),
            "{from}: {f}"
        );
        assert!(f.contains("protocol all"), "{from}: {f}");
    }

    // What the guest is told.
    assert_eq!(guest.interfaces.len(), 1);
    let i = &guest.interfaces[0];
    assert_eq!((i.name.as_str(), i.mtu), ("eth0", 1400));
    assert_eq!(i.mac, "0a:58:0a:58:00:05");
    assert_eq!(i.boot_mac, i.mac);
    assert!(
        i.addresses.contains(&"10.88.0.5/16".to_string()),
        "{:?}",
        i.addresses
    );
    assert!(
        i.addresses.contains(&"fd00:88::5/64".to_string()),
        "{:?}",
        i.addresses
    );
    assert!(
        !i.addresses.iter().any(|a| a.starts_with("fe80")),
        "{:?}",
        i.addresses
    );
    let routes: Vec<(&str, &str)> = guest
        .routes
        .iter()
        .map(|r| (r.destination.as_str(), r.gateway.as_str()))
        .collect();
    assert!(routes.contains(&("0.0.0.0/0", "10.88.0.1")), "{routes:?}");
    assert!(routes.contains(&("192.168.7.0/24", "")), "{routes:?}");
    // The kernel's own prefix routes are not sent (the guest makes them).
    assert!(
        !routes.iter().any(|(d, _)| *d == "10.88.0.0/16"),
        "{routes:?}"
    );
    assert_eq!(guest.neighbours.len(), 1, "{:?}", guest.neighbours);
    assert_eq!(guest.neighbours[0].address, "10.88.0.9");

    net.detach();
    assert_eq!(ns.husk_traces(), Vec::<String>::new());
    // The host interface keeps its address (CNI's bookkeeping stays true).
    assert!(ns.sh("ip -o addr show eth0").contains("10.88.0.5/16"));
}

#[test]
fn root_dropping_the_network_removes_it_and_a_record_cleans_up_after_a_dead_owner() {
    let (ns, _peer) = cni_like("drop");
    {
        let _ = HostNetwork::attach(&ns.path(), false).unwrap();
    }
    assert_eq!(ns.husk_traces(), Vec::<String>::new());

    // A recorded network whose owner died: the tap fd is gone with it (the
    // tap with it), the filters on eth0 stay until detach_recorded.
    let dir = husk_testutil::TempDir::new("net-record");
    let (mut net, _) = HostNetwork::attach(&ns.path(), false).unwrap();
    net.record_in(&dir.0);
    assert!(dir.0.join(husk_runtime::net::NET_FILE).is_file());
    std::mem::forget(net); // as if the process had died
    assert!(!ns.husk_traces().is_empty());
    husk_runtime::net::detach_recorded(&dir.0);
    // The forgotten descriptor still holds the tap in this process, but
    // detach_recorded deletes it by name.
    assert_eq!(ns.husk_traces(), Vec::<String>::new());
    assert!(!dir.0.join(husk_runtime::net::NET_FILE).exists());
}

#[test]
fn root_an_empty_namespace_gets_a_spare_nic_only_when_asked_and_joins_a_late_interface() {
    husk_testutil::require_root("the network root tests");
    let ns = TestNetns::new("late");
    let peer = TestNetns::new("late-peer");
    let (net, guest) = HostNetwork::attach(&ns.path(), false).unwrap();
    assert!(net.nics().is_empty() && guest.is_empty());
    drop(net);

    let (mut net, guest) = HostNetwork::attach(&ns.path(), true).unwrap();
    assert_eq!(net.nics().len(), 1);
    assert!(guest.is_empty());
    let boot_mac = net.nics()[0].mac_string();
    // A hook configures the namespace after the VM booted.
    veth(&ns, &peer, "eth0");
    ns.sh(
        "ip link set eth0 mtu 1450 && ip addr add 172.18.0.2/16 dev eth0 && \
         ip route add default via 172.18.0.1",
    );
    let late = net.connect_late().unwrap();
    assert_eq!(late.interfaces.len(), 1, "{late:?}");
    let i = &late.interfaces[0];
    assert_eq!(i.boot_mac, boot_mac);
    assert_ne!(i.mac, boot_mac, "the guest takes eth0's MAC");
    assert_eq!(i.mtu, 1450);
    assert!(ns.sh("ip -o link show husktap0").contains("mtu 1450"));
    assert!(ns
        .sh("tc filter show dev eth0 ingress")
        .contains("Egress Redirect to device husktap0"));
    // No spare left: a second late interface is not joined.
    veth(&ns, &peer, "eth1");
    assert!(net.connect_late().unwrap().is_empty());
    net.detach();
    assert_eq!(ns.husk_traces(), Vec::<String>::new());
}

#[test]
fn root_a_missing_namespace_is_named_in_the_error() {
    husk_testutil::require_root("the network root tests");
    let e = HostNetwork::attach(std::path::Path::new("/run/netns/husk-no-such-ns"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/run/netns/husk-no-such-ns"), "{e}");
}
