//! The sandbox's network on the host: the container's network namespace
//! carried into the VM at layer 2.
//!
//! Containers live at layer 3 and a VM at layer 2, so the interfaces that
//! podman, CNI or Docker made in the container's network namespace (a veth
//! of a bridge, slirp4netns's `tap0`, a macvlan) are handed to the guest
//! whole: for each one a tap device is made in that namespace and the two
//! are joined with tc, an ingress qdisc on each and a mirred redirect from
//! each to the other's egress. QEMU gets the tap's descriptor (`-netdev
//! tap,fd=`) and the guest NIC the interface's MAC; the agent then gives
//! the NIC the interface's name, MTU, addresses, routes and permanent
//! neighbours inside the container's namespace in the guest
//! (`ConfigureNetwork`). The host interfaces keep their addresses, so CNI's
//! and podman's bookkeeping stays true; their own stack sees no traffic.
//!
//! The taps are not persistent: each goes with the last descriptor, so
//! with QEMU. The filters stay on the host interfaces until
//! [`HostNetwork::detach`] removes them, on every teardown path; the names
//! are recorded in the state dir ([`NET_FILE`]) for whoever cleans up after
//! a dead monitor or shim ([`detach_recorded`]).
//!
//! A namespace with no interface when the VM boots but hooks that may add
//! some before start (Docker's `libnetwork-setkey`) gets one spare tap:
//! the NIC is there from boot, and [`HostNetwork::connect_late`] joins it
//! to the interface that appeared. microvm has no hot-plug, so interfaces
//! added after start are not seen (docs/networking.md).
//!
//! Every netlink call runs on a thread of its own that enters the
//! namespace (`setns` changes only the calling thread), with sockets made
//! after it entered.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use husk_hypervisor::Nic;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

/// The file in the sandbox's state dir that records what [`HostNetwork`]
/// changed on the host.
pub const NET_FILE: &str = "network.json";

/// Names of the taps husk makes: `husktap0`, `husktap1`...
pub const TAP_PREFIX: &str = "husktap";

/// `ETH_P_ALL` in network byte order, as tc's `protocol all`.
const PROTOCOL_ALL: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle (`ffff:`), the parent of its filters.
const INGRESS_PARENT: u32 = 0xffff_0000;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open the container's network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make tap {name} in {netns} for the VM: {source}; is /dev/net/tun present (modprobe tun)?")]
    Tap {
        name: String,
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} in the network namespace {netns}: {source}")]
    Netlink {
        what: String,
        netns: PathBuf,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("network thread: {0}")]
    Io(#[from] std::io::Error),
}

/// What the guest is told: the shape of `ConfigureNetworkRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub interfaces: Vec<GuestInterface>,
    pub routes: Vec<GuestRoute>,
    pub neighbours: Vec<GuestNeighbour>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    pub boot_mac: String,
    pub mac: String,
    pub name: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    pub destination: String,
    pub gateway: String,
    pub device: String,
    pub source: String,
    pub metric: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNeighbour {
    pub address: String,
    pub mac: String,
    pub device: String,
}

impl GuestNetwork {
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty()
    }
}

/// An interface of the host namespace, as scanned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostIf {
    index: u32,
    name: String,
    mac: Option<[u8; 6]>,
    mtu: u32,
    up: bool,
    addresses: Vec<(IpAddr, u8)>,
}

/// A namespace's interfaces, routes and permanent neighbours.
#[derive(Debug, Clone, Default)]
struct Scan {
    interfaces: Vec<HostIf>,
    routes: Vec<ScannedRoute>,
    neighbours: Vec<(u32, IpAddr, [u8; 6])>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ScannedRoute {
    oif: u32,
    destination: (IpAddr, u8),
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    metric: u32,
}

/// A tap and what it is joined to.
#[derive(Debug)]
struct Tap {
    name: String,
    index: u32,
    mac: [u8; 6],
    fd: Arc<OwnedFd>,
    /// The host interface it is joined to (`None`: a spare, not yet).
    joined: Option<String>,
}

/// What is recorded in [`NET_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub netns: PathBuf,
    /// Host interfaces that carry husk's ingress qdisc.
    pub joined: Vec<String>,
    pub taps: Vec<String>,
}

/// The owner of what a sandbox changed in its network namespace.
#[derive(Debug)]
pub struct HostNetwork {
    netns: PathBuf,
    /// The namespace itself when husk made it ([`new_netns`]), held so that
    /// `netns` (a `/proc/<pid>/fd/<n>` path to it) stays valid.
    held: Option<Arc<OwnedFd>>,
    taps: Vec<Tap>,
    record_file: Option<PathBuf>,
    detached: bool,
}

impl HostNetwork {
    /// Joins every interface of the namespace at `netns` to a new tap
    /// (plus one spare tap if there is none and `spare` is set). Returns
    /// the VM's NICs (in [`HostNetwork::nics`]) and what the guest must be
    /// told. On error nothing of it is left.
    pub fn attach(netns: &Path, spare: bool) -> Result<(HostNetwork, GuestNetwork), NetError> {
        let mut net = HostNetwork {
            netns: netns.to_path_buf(),
            held: None,
            taps: Vec::new(),
            record_file: None,
            detached: false,
        };
        let guest = net.join_new(spare)?;
        Ok((net, guest))
    }

    /// As [`HostNetwork::attach`], on a namespace husk made ([`new_netns`])
    /// that starts empty: one spare NIC, joined at start to what was put
    /// there meanwhile (ctr's CNI configures the namespace of the task's
    /// pid, QEMU's, after create).
    pub fn attach_new(netns: Arc<OwnedFd>) -> Result<HostNetwork, NetError> {
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            netns.as_raw_fd()
        ));
        let (mut net, _) = HostNetwork::attach(&path, true)?;
        net.held = Some(netns);
        Ok(net)
    }

    /// Records what this changed in `dir/NET_FILE`, now and after every
    /// change, for [`detach_recorded`].
    pub fn record_in(&mut self, dir: &Path) {
        self.record_file = Some(dir.join(NET_FILE));
        self.save_record();
    }

    fn record(&self) -> Record {
        Record {
            netns: self.netns.clone(),
            joined: self.taps.iter().filter_map(|t| t.joined.clone()).collect(),
            taps: self.taps.iter().map(|t| t.name.clone()).collect(),
        }
    }

    fn save_record(&self) {
        if let Some(f) = &self.record_file {
            let body = serde_json::to_vec(&self.record()).unwrap_or_default();
            if let Err(e) = std::fs::write(f, body) {
                tracing::warn!(path = %f.display(), error = %e, "cannot record the sandbox's network");
            }
        }
    }

    /// The VM's NICs, one per tap.
    pub fn nics(&self) -> Vec<Nic> {
        self.taps
            .iter()
            .map(|t| Nic {
                tap: Some(t.fd.clone()),
                mac: t.mac,
            })
            .collect()
    }

    /// Gives the VM's first NIC the boot MAC `mac` (a VM template's NIC,
    /// which every guest restored from it has), and rewrites `guest` to
    /// find it by that MAC. The agent still gives it the interface's MAC.
    pub fn set_boot_mac(&mut self, mac: [u8; 6], guest: &mut GuestNetwork) {
        if let Some(t) = self.taps.first_mut() {
            let old = fmt_mac(&t.mac);
            t.mac = mac;
            for i in &mut guest.interfaces {
                if i.boot_mac == old {
                    i.boot_mac = fmt_mac(&mac);
                }
            }
        }
    }

    /// How many NICs the VM has.
    pub fn nic_count(&self) -> usize {
        self.taps.len()
    }

    /// Whether a spare tap still waits for an interface.
    pub fn has_spare(&self) -> bool {
        self.taps.iter().any(|t| t.joined.is_none())
    }

    /// Joins interfaces that appeared since [`HostNetwork::attach`] to the
    /// spare taps; returns what the guest must be told about them (empty
    /// when nothing new could be joined).
    pub fn connect_late(&mut self) -> Result<GuestNetwork, NetError> {
        if !self.has_spare() {
            return Ok(GuestNetwork::default());
        }
        self.join_new(false)
    }

    /// Scans the namespace and joins each interface not yet joined to a
    /// spare tap or a new one (new ones only at attach time: `make_taps`).
    fn join_new(&mut self, spare_if_none: bool) -> Result<GuestNetwork, NetError> {
        let netns = self.netns.clone();
        let make_taps = self.taps.is_empty();
        let existing: Vec<(String, u32, Option<String>)> = self
            .taps
            .iter()
            .map(|t| (t.name.clone(), t.index, t.joined.clone()))
            .collect();
        let (made, joins, scan) = in_netns(&netns, move |h, ns| async move {
            let ns = ns.as_path();
            let scan = scan(&h, ns).await?;
            let candidates: Vec<HostIf> = scan
                .interfaces
                .iter()
                .filter(|i| i.name != "lo" && !i.name.starts_with(TAP_PREFIX) && i.mac.is_some())
                .filter(|i| {
                    !existing
                        .iter()
                        .any(|(_, _, j)| j.as_deref() == Some(&i.name))
                })
                .cloned()
                .collect();
            let mut made: Vec<Tap> = Vec::new();
            let mut joins: Vec<(usize, HostIf)> = Vec::new();
            let mut spares: Vec<(usize, u32)> = existing
                .iter()
                .enumerate()
                .filter(|(_, (_, _, j))| j.is_none())
                .map(|(n, (_, idx, _))| (n, *idx))
                .collect();
            let result = async {
                for host in candidates {
                    let (slot, tap_index) = if let Some(s) = spares.first().copied() {
                        spares.remove(0);
                        h.link()
                            .set(LinkUnspec::new_with_index(s.1).mtu(host.mtu).build())
                            .execute()
                            .await
                            .map_err(nl(format!("setting the MTU of the tap for {}", host.name), ns))?;
                        s
                    } else if make_taps {
                        let n = made.len();
                        let tap = make_tap(&h, ns, n, host.mac.expect("filtered"), host.mtu).await?;
                        let idx = tap.index;
                        made.push(tap);
                        (n, idx)
                    } else {
                        tracing::warn!(interface = %host.name, "an interface appeared after the VM booted and no NIC is left for it: it is not carried into the guest");
                        continue;
                    };
                    join(&h, ns, &host, tap_index).await?;
                    joins.push((slot, host));
                }
                if make_taps && made.is_empty() && spare_if_none {
                    let mac = local_mac();
                    made.push(make_tap(&h, ns, 0, mac, 1500).await?);
                }
                Ok::<_, NetError>(())
            }
            .await;
            if let Err(e) = result {
                // Undo this round: filters on the interfaces joined now, the
                // taps made now (their descriptors close with `made`).
                for (_, host) in &joins {
                    unjoin(&h, host.index).await;
                }
                for t in &made {
                    let _ = h.link().del(t.index).execute().await;
                }
                return Err(e);
            }
            Ok((made, joins, scan))
        })?;
        if make_taps {
            self.taps = made;
        }
        let mut guest = GuestNetwork::default();
        for (slot, host) in &joins {
            // A new tap's NIC has the interface's MAC from boot (make_tap);
            // a spare's gets it from the agent.
            let tap = &mut self.taps[*slot];
            tap.joined = Some(host.name.clone());
            guest.interfaces.push(GuestInterface {
                boot_mac: fmt_mac(&tap.mac),
                mac: fmt_mac(&host.mac.expect("filtered")),
                name: host.name.clone(),
                mtu: host.mtu,
                addresses: host
                    .addresses
                    .iter()
                    .map(|(ip, len)| format!("{ip}/{len}"))
                    .collect(),
            });
        }
        let joined: BTreeMap<u32, &str> = joins
            .iter()
            .map(|(_, h)| (h.index, h.name.as_str()))
            .collect();
        for r in &scan.routes {
            if let Some(dev) = joined.get(&r.oif) {
                guest.routes.push(GuestRoute {
                    destination: format!("{}/{}", r.destination.0, r.destination.1),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: dev.to_string(),
                    source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                    metric: r.metric,
                });
            }
        }
        for (idx, ip, mac) in &scan.neighbours {
            if let Some(dev) = joined.get(idx) {
                guest.neighbours.push(GuestNeighbour {
                    address: ip.to_string(),
                    mac: fmt_mac(mac),
                    device: dev.to_string(),
                });
            }
        }
        if !guest.is_empty() {
            tracing::info!(netns = %self.netns.display(), interfaces = ?guest.interfaces.iter().map(|i| &i.name).collect::<Vec<_>>(), "network carried into the VM");
        }
        self.save_record();
        Ok(guest)
    }

    /// Removes the filters from the host interfaces and the taps. Idempotent.
    pub fn detach(&mut self) {
        if self.detached {
            return;
        }
        self.detached = true;
        let rec = self.record();
        self.taps.clear();
        detach(&rec);
        if let Some(f) = &self.record_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for HostNetwork {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Undoes what a [`HostNetwork`] recorded in `dir` (its owner died).
pub fn detach_recorded(dir: &Path) {
    let f = dir.join(NET_FILE);
    let Ok(body) = std::fs::read(&f) else {
        return;
    };
    match serde_json::from_slice::<Record>(&body) {
        Ok(rec) => detach(&rec),
        Err(e) => tracing::warn!(path = %f.display(), error = %e, "unreadable network record"),
    }
    let _ = std::fs::remove_file(&f);
}

fn detach(rec: &Record) {
    if rec.joined.is_empty() && rec.taps.is_empty() {
        return;
    }
    let rec2 = rec.clone();
    let r = in_netns(&rec.netns, move |h, _| async move {
        let links = links(&h).await.unwrap_or_default();
        for l in &links {
            let Some(name) = link_name(l) else { continue };
            if rec2.joined.contains(&name) {
                unjoin(&h, l.header.index).await;
            } else if rec2.taps.contains(&name) {
                let _ = h.link().del(l.header.index).execute().await;
            }
        }
        Ok(())
    });
    match r {
        Ok(()) => tracing::debug!(netns = %rec.netns.display(), "network detached"),
        // The namespace went first (podman and CNI remove it): so did
        // everything in it.
        Err(NetError::Netns { .. }) => {}
        Err(e) => tracing::warn!("cannot remove the sandbox's network filters: {e}"),
    }
}

/// Runs `f` with a netlink handle inside the namespace at `netns`, on a
/// thread of its own.
fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(Handle, PathBuf) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetError>>,
{
    let path = netns.to_path_buf();
    let file = File::open(&path).map_err(|source| NetError::Netns {
        path: path.clone(),
        source,
    })?;
    std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
                path: path.clone(),
                source: e.into(),
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(conn);
                f(handle, path).await
            })
        })?
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the network thread panicked").into()))
}

fn nl(what: impl Into<String>, netns: &Path) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    let netns = netns.to_path_buf();
    move |source| NetError::Netlink {
        what,
        netns,
        source,
    }
}

async fn links(h: &Handle) -> Result<Vec<LinkMessage>, rtnetlink::Error> {
    h.link().get().execute().try_collect().await
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

async fn scan(h: &Handle, ns: &Path) -> Result<Scan, NetError> {
    use rtnetlink::packet_route::link::LinkFlags;
    let mut out = Scan::default();
    for l in links(h).await.map_err(nl("listing interfaces", ns))? {
        let mut i = HostIf {
            index: l.header.index,
            name: link_name(&l).unwrap_or_default(),
            mac: None,
            mtu: 1500,
            up: l.header.flags.contains(LinkFlags::Up),
            addresses: Vec::new(),
        };
        for a in &l.attributes {
            match a {
                LinkAttribute::Address(m) => i.mac = m.as_slice().try_into().ok(),
                LinkAttribute::Mtu(m) => i.mtu = *m,
                _ => {}
            }
        }
        out.interfaces.push(i);
    }
    let addrs: Vec<_> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses", ns))?;
    for a in addrs {
        if a.header.scope == AddressScope::Link || a.header.scope == AddressScope::Host {
            continue; // link-local (the guest makes its own) and loopback
        }
        let ip = a
            .attributes
            .iter()
            .find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
        if let (Some(ip), Some(i)) = (
            ip,
            out.interfaces
                .iter_mut()
                .find(|i| i.index == a.header.index),
        ) {
            i.addresses.push((ip, a.header.prefix_len));
        }
    }
    for family in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let routes: Vec<RouteMessage> = h
            .route()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes", ns))?;
        out.routes.extend(routes.iter().filter_map(route_of));
    }
    let neigh: Vec<_> = h
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing neighbours", ns))?;
    for n in neigh {
        if n.header.state != NeighbourState::Permanent {
            continue;
        }
        let ip = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        });
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        });
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.neighbours.push((n.header.ifindex, ip, mac));
        }
    }
    Ok(out)
}

/// The routes the guest needs: unicast routes of the main table that the
/// kernel does not make by itself from an address (`proto kernel`).
fn route_of(r: &RouteMessage) -> Option<ScannedRoute> {
    let hdr: &RouteHeader = &r.header;
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(hdr.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || hdr.kind != RouteType::Unicast
        || hdr.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    };
    let mut oif = None;
    let mut dst = None;
    let mut gateway = None;
    let mut source = None;
    let mut metric = 0;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(d) => dst = ip(d),
            RouteAttribute::Gateway(g) => gateway = ip(g),
            RouteAttribute::PrefSource(s) => source = ip(s),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    let v4 = matches!(
        hdr.address_family,
        rtnetlink::packet_route::AddressFamily::Inet
    );
    let dst = dst.unwrap_or(if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    });
    if let IpAddr::V6(v6) = dst {
        // Link-local and multicast routes: the guest's kernel makes its own.
        if (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_multicast() {
            return None;
        }
    }
    Some(ScannedRoute {
        oif: oif?,
        destination: (dst, hdr.destination_prefix_length),
        gateway,
        source,
        metric,
    })
}

/// Makes tap `husktap<n>` (mtu, up) in the namespace; the NIC gets `mac`.
async fn make_tap(
    h: &Handle,
    ns: &Path,
    n: usize,
    mac: [u8; 6],
    mtu: u32,
) -> Result<Tap, NetError> {
    let name = format!("{TAP_PREFIX}{n}");
    let fd = husk_sys::open_tap(&name).map_err(|source| NetError::Tap {
        name: name.clone(),
        netns: ns.to_path_buf(),
        source,
    })?;
    let link = h
        .link()
        .get()
        .match_name(name.clone())
        .execute()
        .try_next()
        .await
        .map_err(nl(format!("finding tap {name}"), ns))?
        .ok_or_else(|| NetError::Tap {
            name: name.clone(),
            netns: ns.to_path_buf(),
            source: std::io::Error::other("made, but not listed"),
        })?;
    let index = link.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("setting up tap {name}"), ns))?;
    Ok(Tap {
        name,
        index,
        mac,
        fd: Arc::new(fd),
        joined: None,
    })
}

/// Joins `host` and the tap at `tap`: an ingress qdisc on each, and a
/// filter on each that redirects every frame to the other's egress.
async fn join(h: &Handle, ns: &Path, host: &HostIf, tap: u32) -> Result<(), NetError> {
    if !host.up {
        h.link()
            .set(LinkUnspec::new_with_index(host.index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bringing {} up", host.name), ns))?;
    }
    for (from, to, what) in [
        (host.index, tap, &host.name),
        (tap, host.index, &"tap".to_string()),
    ] {
        h.qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(nl(format!("adding an ingress qdisc to {what}"), ns))?;
        h.traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map_err(nl("building the redirect filter", ns))?
            .execute()
            .await
            .map_err(nl(format!("adding the redirect filter to {what}"), ns))?;
    }
    Ok(())
}

/// Removes the ingress qdisc (and so its filters) from interface `index`.
async fn unjoin(h: &Handle, index: u32) {
    let mut req = h.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
    if let Err(e) = req.execute().await {
        tracing::debug!(index, error = %e, "removing the ingress qdisc");
    }
}

/// A random locally administered unicast MAC, for a spare NIC.
fn local_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    if let Ok(mut f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut m);
    }
    m[0] = (m[0] & 0xfc) | 0x02;
    m
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A new host network namespace, by a descriptor (made on a thread of its
/// own, which ends; the namespace lives as long as a descriptor or a
/// process in it).
pub fn new_netns() -> Result<OwnedFd, NetError> {
    std::thread::Builder::new()
        .name("husk-new-netns".into())
        .spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
                path: PathBuf::from("(a new network namespace)"),
                source: e.into(),
            })?;
            let f = File::open("/proc/thread-self/ns/net").map_err(|source| NetError::Netns {
                path: PathBuf::from("/proc/thread-self/ns/net"),
                source,
            })?;
            Ok(OwnedFd::from(f))
        })?
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the network thread panicked").into()))
}

static OWN_NETNS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// For a container whose spec asks for a new network namespace without
/// naming one (Docker's, runc's default spec): this process (the CLI's
/// monitor, whose pid husk reports) moves into a new host network
/// namespace of its own, so hooks that configure `/proc/PID/ns/net`
/// (Docker's `libnetwork-setkey`) configure that one, never the host's,
/// and what they make there is carried into the VM. Call it while the
/// process has one thread: every thread started later inherits it.
pub fn enter_own_netns() -> Result<(), NetError> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
        path: PathBuf::from("(a new network namespace)"),
        source: e.into(),
    })?;
    let _ = OWN_NETNS.set(PathBuf::from(format!(
        "/proc/{}/ns/net",
        std::process::id()
    )));
    Ok(())
}

/// The namespace [`enter_own_netns`] made, by a path other processes can
/// open while this one lives.
pub fn own_netns() -> Option<PathBuf> {
    OWN_NETNS.get().cloned()
}

/// Whether `spec` asks for a new network namespace without a path.
pub fn wants_new_netns(spec: &oci_spec::runtime::Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| {
            nss.iter().any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_none()
            })
        })
}

/// The network namespace a sandbox's VM serves: the path its owner's spec
/// names, or `None` (the guest gets a namespace with loopback only).
pub fn spec_netns(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_mac_is_local_and_unicast() {
        for _ in 0..32 {
            let m = local_mac();
            assert_eq!(m[0] & 0x03, 0x02, "{}", fmt_mac(&m));
        }
    }

    #[test]
    fn protocol_all_is_in_network_order() {
        assert_eq!(PROTOCOL_ALL.to_ne_bytes(), [0x00, 0x03]);
    }

    #[test]
    fn the_spec_names_the_namespace() {
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/run/netns/x"}]}}"#,
        )
        .unwrap();
        assert_eq!(spec_netns(&spec), Some(PathBuf::from("/run/netns/x")));
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"namespaces":[{"type":"network"}]}}"#,
        )
        .unwrap();
        assert_eq!(spec_netns(&spec), None);
    }
}
