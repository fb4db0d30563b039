//! The sandbox's network inside the guest (`ConfigureNetwork`): the NICs
//! QEMU gives the VM move from the guest's own network namespace into the
//! namespace of a container's init and take the host interface's name,
//! MAC, MTU and addresses; then the routes and permanent neighbours. All of
//! it over rtnetlink, on a thread of its own that enters the container's
//! namespace (`setns` changes only the calling thread, and the runtime's
//! worker threads must stay where they are).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use husk_protocol::agent::ConfigureNetworkRequest;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// A MAC address.
pub type Mac = [u8; 6];

/// One interface, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub boot_mac: Mac,
    pub mac: Mac,
    pub name: String,
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: (IpAddr, u8),
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub metric: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub address: IpAddr,
    pub mac: Mac,
    pub device: String,
}

/// A checked `ConfigureNetworkRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network configuration: {0}")]
    Invalid(String),
    #[error("no NIC with MAC {mac} in the guest: the VM was booted without it")]
    NoNic { mac: String },
    #[error("cannot enter the network namespace of the container's init (pid {pid}): {source}")]
    Netns {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn invalid(s: impl Into<String>) -> NetError {
    NetError::Invalid(s.into())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<Mac, NetError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid(format!("MAC {s:?} is not six hex bytes")));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(invalid(format!("MAC {s:?} is not six hex bytes")));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| invalid(format!("MAC {s:?} is not hex")))?;
    }
    Ok(mac)
}

pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `ip/prefix`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), NetError> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| invalid(format!("address {s:?} has no /prefix")))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| invalid(format!("address {s:?} is not an IP address")))?;
    let len: u8 = len
        .parse()
        .map_err(|_| invalid(format!("address {s:?} has a bad prefix length")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(invalid(format!("address {s:?}: prefix length over {max}")));
    }
    Ok((ip, len))
}

fn parse_ip(s: &str, what: &str) -> Result<Option<IpAddr>, NetError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| invalid(format!("{what} {s:?} is not an IP address")))
}

/// A Linux interface name: 1 to 15 bytes, no `/`, `:` or whitespace, not
/// `.` or `..`.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

impl NetConfig {
    /// Checks every field of `req`; nothing is applied from a bad one.
    pub fn parse(req: &ConfigureNetworkRequest) -> Result<NetConfig, NetError> {
        let mut interfaces = Vec::new();
        for i in &req.interfaces {
            if !valid_ifname(&i.name) {
                return Err(invalid(format!("interface name {:?} is not valid", i.name)));
            }
            if !(68..=65535).contains(&i.mtu) {
                return Err(invalid(format!(
                    "interface {}: MTU {} is out of range (68-65535)",
                    i.name, i.mtu
                )));
            }
            interfaces.push(Interface {
                boot_mac: parse_mac(&i.boot_mac)?,
                mac: parse_mac(&i.mac)?,
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| parse_cidr(a))
                    .collect::<Result<_, _>>()?,
            });
        }
        let known = |d: &str| interfaces.iter().any(|i| i.name == d);
        let mut routes = Vec::new();
        for r in &req.routes {
            if !known(&r.device) {
                return Err(invalid(format!(
                    "route to {} names device {:?}, which is not among the interfaces",
                    r.destination, r.device
                )));
            }
            let destination = parse_cidr(&r.destination)?;
            let gateway = parse_ip(&r.gateway, "gateway")?;
            let source = parse_ip(&r.source, "route source")?;
            for ip in gateway.iter().chain(source.iter()) {
                if ip.is_ipv4() != destination.0.is_ipv4() {
                    return Err(invalid(format!(
                        "route to {} mixes IPv4 and IPv6 ({ip})",
                        r.destination
                    )));
                }
            }
            routes.push(Route {
                destination,
                gateway,
                device: r.device.clone(),
                source,
                metric: r.metric,
            });
        }
        let mut neighbours = Vec::new();
        for n in &req.neighbours {
            if !known(&n.device) {
                return Err(invalid(format!(
                    "neighbour {} names device {:?}, which is not among the interfaces",
                    n.address, n.device
                )));
            }
            neighbours.push(Neighbour {
                address: parse_ip(&n.address, "neighbour")?
                    .ok_or_else(|| invalid("a neighbour has no address"))?,
                mac: parse_mac(&n.mac)?,
                device: n.device.clone(),
            });
        }
        Ok(NetConfig {
            interfaces,
            routes,
            neighbours,
        })
    }
}

/// Applies `cfg` to the network namespace of process `pid` (a container's
/// init). Blocks: run it on a thread that may change namespace
/// ([`apply_on_own_thread`]).
fn apply_blocking(pid: i32, cfg: &NetConfig) -> Result<(), NetError> {
    let netns = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|source| NetError::Netns { pid, source })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    // First, in the guest's own namespace: move the NICs that are still
    // here into the container's.
    rt.block_on(async {
        let handle = connect()?;
        let links = links(&handle).await?;
        for i in &cfg.interfaces {
            if let Some(link) = links.iter().find(|l| link_mac(l) == Some(i.boot_mac)) {
                let msg = LinkUnspec::new_with_index(link.header.index)
                    .down()
                    .setns_by_fd(netns.as_raw_fd())
                    .build();
                handle.link().set(msg).execute().await.map_err(nl(format!(
                    "moving the NIC {} into the container's namespace",
                    format_mac(&i.boot_mac)
                )))?;
            }
        }
        Ok::<_, NetError>(())
    })?;
    setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
        pid,
        source: e.into(),
    })?;
    // Then, inside it (a new socket, made in the namespace just entered).
    rt.block_on(async {
        let handle = connect()?;
        let links = links(&handle).await?;
        let mut index = std::collections::HashMap::new();
        for i in &cfg.interfaces {
            let link = links
                .iter()
                .find(|l| link_mac(l) == Some(i.boot_mac) || link_mac(l) == Some(i.mac))
                .ok_or_else(|| NetError::NoNic {
                    mac: format_mac(&i.boot_mac),
                })?;
            let idx = link.header.index;
            index.insert(i.name.clone(), idx);
            let already = link.header.flags.contains(LinkFlags::Up)
                && link_name(link).as_deref() == Some(&i.name);
            if already {
                tracing::debug!(name = %i.name, "interface already configured");
                continue;
            }
            let msg = LinkUnspec::new_with_index(idx)
                .name(i.name.clone())
                .mtu(i.mtu)
                .address(i.mac.to_vec())
                .build();
            handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(nl(format!("naming {} and setting its MTU and MAC", i.name)))?;
            let up = LinkUnspec::new_with_index(idx).up().build();
            handle
                .link()
                .set(up)
                .execute()
                .await
                .map_err(nl(format!("bringing {} up", i.name)))?;
            for (ip, len) in &i.addresses {
                let mut req = handle.address().add(idx, *ip, *len).replace();
                if ip.is_ipv6() {
                    // The host already did duplicate address detection.
                    req.message_mut()
                        .attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                req.execute()
                    .await
                    .map_err(nl(format!("adding {ip}/{len} to {}", i.name)))?;
            }
            tracing::info!(name = %i.name, mac = %format_mac(&i.mac), mtu = i.mtu, addresses = ?i.addresses, "interface up");
        }
        // On-link routes first: a gateway must be reachable when its route
        // is added.
        let mut routes: Vec<&Route> = cfg.routes.iter().collect();
        routes.sort_by_key(|r| r.gateway.is_some());
        for r in routes {
            let idx = index[&r.device];
            let (dst, len) = r.destination;
            let mut b = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(dst, len)
                .map_err(|e| invalid(e.to_string()))?
                .output_interface(idx);
            b = match r.gateway {
                Some(gw) => b.gateway(gw).map_err(|e| invalid(e.to_string()))?,
                None => b.scope(RouteScope::Link),
            };
            if let Some(src) = r.source {
                b = b.pref_source(src).map_err(|e| invalid(e.to_string()))?;
            }
            if r.metric != 0 {
                b = b.priority(r.metric);
            }
            handle
                .route()
                .add(b.build())
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding the route to {dst}/{len} via {}", r.device)))?;
        }
        for n in &cfg.neighbours {
            let idx = index[&n.device];
            handle
                .neighbours()
                .add(idx, n.address)
                .link_layer_address(&n.mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding the neighbour {} on {}", n.address, n.device)))?;
        }
        Ok(())
    })
}

/// Applies `cfg` to the network namespace of process `pid` on a thread
/// made for it (which ends in that namespace, so it is not reused).
pub async fn apply(pid: i32, cfg: NetConfig) -> Result<(), NetError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("net-config".into())
        .spawn(move || {
            let _ = tx.send(apply_blocking(pid, &cfg));
        })?;
    rx.await
        .unwrap_or_else(|_| Err(invalid("the network thread died")))
}

fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

fn nl(what: String) -> impl FnOnce(rtnetlink::Error) -> NetError {
    move |source| NetError::Netlink { what, source }
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing the network interfaces".into()))
}

fn link_mac(l: &LinkMessage) -> Option<Mac> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => a.as_slice().try_into().ok(),
        _ => None,
    })
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::agent::{Interface as PInterface, Neighbour as PNeighbour, Route as PRoute};
    use proptest::prelude::*;

    fn req() -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            container_id: "c".into(),
            interfaces: vec![PInterface {
                boot_mac: "52:54:00:12:34:56".into(),
                mac: "0a:58:0a:58:00:05".into(),
                name: "eth0".into(),
                mtu: 1500,
                addresses: vec!["10.88.0.5/16".into(), "fd00::5/64".into()],
                ..Default::default()
            }],
            routes: vec![PRoute {
                destination: "0.0.0.0/0".into(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            neighbours: vec![PNeighbour {
                address: "10.88.0.1".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_request_parses() {
        let c = NetConfig::parse(&req()).unwrap();
        assert_eq!(c.interfaces[0].mac, [0x0a, 0x58, 0x0a, 0x58, 0, 5]);
        assert_eq!(
            c.interfaces[0].addresses,
            vec![
                ("10.88.0.5".parse().unwrap(), 16),
                ("fd00::5".parse().unwrap(), 64)
            ]
        );
        assert_eq!(c.routes[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(format_mac(&c.neighbours[0].mac), "aa:bb:cc:dd:ee:ff");
    }

    #[test]
    fn bad_fields_are_named() {
        type Edit = Box<dyn Fn(&mut ConfigureNetworkRequest)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|r| r.interfaces[0].mac = "0a:58".into()),
                "six hex bytes",
            ),
            (
                Box::new(|r| r.interfaces[0].boot_mac = "zz:54:00:12:34:56".into()),
                "not hex",
            ),
            (
                Box::new(|r| r.interfaces[0].name = "eth0/../x".into()),
                "not valid",
            ),
            (
                Box::new(|r| r.interfaces[0].name = "a-very-long-ifname".into()),
                "not valid",
            ),
            (Box::new(|r| r.interfaces[0].mtu = 9), "MTU 9"),
            (
                Box::new(|r| r.interfaces[0].addresses[0] = "10.88.0.5".into()),
                "no /prefix",
            ),
            (
                Box::new(|r| r.interfaces[0].addresses[0] = "10.88.0.5/33".into()),
                "over 32",
            ),
            (
                Box::new(|r| r.routes[0].device = "eth1".into()),
                "not among the interfaces",
            ),
            (
                Box::new(|r| r.routes[0].gateway = "fd00::1".into()),
                "mixes IPv4 and IPv6",
            ),
            (
                Box::new(|r| r.neighbours[0].address = "".into()),
                "no address",
            ),
        ];
        for (edit, want) in cases {
            let mut r = req();
            edit(&mut r);
            let e = NetConfig::parse(&r).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(mac in ".{0,24}", name in ".{0,20}", addr in ".{0,48}", mtu in any::<u32>()) {
            let mut r = req();
            r.interfaces[0].mac = mac;
            r.interfaces[0].name = name;
            r.interfaces[0].addresses.push(addr);
            r.interfaces[0].mtu = mtu;
            let _ = NetConfig::parse(&r);
        }

        #[test]
        fn macs_round_trip(mac in any::<[u8; 6]>()) {
            prop_assert_eq!(parse_mac(&format_mac(&mac)).unwrap(), mac);
        }
    }
}
