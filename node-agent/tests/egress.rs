//! The egress rules of `Nat` networking, attacked from inside real guests.
//!
//! Each test runs `runv-agent standalone` under `ip netns exec` in a network
//! namespace of its own (the "node"), with the real `runv-vmm` and the test
//! guest in relay mode (`net=relay`): every 0x88b5 frame the test sends the
//! guest through the bridge, marked `runv-relay:`, the guest sends out
//! verbatim through its own tap, so the frames below are what a hostile
//! guest could send. An "outside" namespace joined to the node by a veth
//! stands for the world (198.51.100.2, a documentation address the rules
//! allow), and also holds the addresses the rules must keep VMs from: the
//! metadata address 169.254.169.254 and a "cluster" address 10.99.0.1.
//!
//! Every attack has a positive control sent the same way, after it, that
//! must get through: so a test fails if the path is broken rather than
//! guarded, and the control's arrival bounds the wait for the attack.
//!
//! Needs root, /dev/kvm, /dev/net/tun, `ip`, `iptables` and `nft`.

mod common;
// Only its sending half is used here.
#[allow(dead_code)]
#[path = "../../vmm/tests/common/packet.rs"]
mod packet;

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Agent, KillVmmOnDrop};
use packet::{ETHERTYPE, PacketSocket};
use runv_node_agent::state::VmDir;
use runv_node_agent::testing::{Need, require};

const WAIT: Duration = Duration::from_secs(60);
const WORLD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const NODE_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const PORT: u16 = 7000;

fn needs(test: &str) -> bool {
    require(
        test,
        &[Need::Root, Need::Kvm, Need::Tun, Need::Iptables, Need::Nft],
    )
}

/// A network namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("runv-eg-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `program args` in the namespace; its stdout, or `None` when it fails.
    fn run(&self, program: &str, args: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip args` in the namespace, which must succeed.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("a thread in the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: setns(2) with a namespace fd we opened; it moves only the
    // calling thread (network namespaces are per thread), one of our own.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Joins `node` to a new "outside" namespace: the node is 198.51.100.1
/// there, the outside 198.51.100.2, and holds the metadata and the
/// "cluster" address too, routed to from the node.
fn outside(node: &Netns, tag: &str) -> Netns {
    let out = Netns::new(tag);
    node.ip(&[
        "link", "add", "up0", "type", "veth", "peer", "name", "world0", "netns", &out.0,
    ]);
    node.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"]);
    node.ip(&["link", "set", "up0", "up"]);
    for a in ["198.51.100.2/24", "169.254.169.254/32", "10.99.0.1/32"] {
        out.ip(&["addr", "add", a, "dev", "world0"]);
    }
    out.ip(&["link", "set", "world0", "up"]);
    node.ip(&["route", "add", "169.254.169.254/32", "via", "198.51.100.2"]);
    node.ip(&["route", "add", "10.99.0.0/24", "via", "198.51.100.2"]);
    out
}

/// What a background listener saw, until it is dropped.
struct Seen<T> {
    items: Arc<Mutex<Vec<T>>>,
    stop: Arc<AtomicBool>,
}

impl<T: Clone> Seen<T> {
    fn all(&self) -> Vec<T> {
        self.items.lock().unwrap().clone()
    }

    /// Waits (bounded) until one item satisfies `f`.
    fn wait_for(&self, what: &str, f: impl Fn(&T) -> bool) {
        let start = Instant::now();
        while !self.all().iter().any(&f) {
            assert!(
                start.elapsed() < WAIT,
                "{what} did not arrive within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl<T> Drop for Seen<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every UDP datagram to `port` on any address of `ns`: (source, payload).
fn udp_listener(ns: &Netns, port: u16) -> Seen<(Ipv4Addr, Vec<u8>)> {
    let items = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (bound_tx, bound) = std::sync::mpsc::channel();
    let (i, s, path) = (
        items.clone(),
        stop.clone(),
        format!("/var/run/netns/{}", ns.0),
    );
    std::thread::spawn(move || {
        enter(&path);
        let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        bound_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, std::net::SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                i.lock().unwrap().push((*from.ip(), buf[..n].to_vec()));
            }
        }
    });
    bound.recv_timeout(WAIT).expect("the listener bound");
    Seen { items, stop }
}

/// Which frames of an interface a sniffer keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Sent by the interface: on a tap, what the bridge delivers to its guest.
    Out,
    /// Received by it: on the bridge device, what reached the node.
    In,
}

/// Every frame interface `ifname` of `ns` sends (`Way::Out`) or receives,
/// but the test's own relay frames (ethertype 0x88b5, which carry the
/// others inside).
fn sniffer(ns: &Netns, ifname: &str, way: Way) -> Seen<Vec<u8>> {
    let items = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (i, s, path) = (
        items.clone(),
        stop.clone(),
        format!("/var/run/netns/{}", ns.0),
    );
    let ifname = ifname.to_owned();
    std::thread::spawn(move || {
        enter(&path);
        let sock = RawSocket::open(&ifname);
        ready_tx.send(()).unwrap();
        while !s.load(Ordering::Relaxed) {
            if let Some((out, f)) = sock.recv()
                && (out == (way == Way::Out))
                && f.len() >= 14
                && f[12..14] != [0x88, 0xb5]
            {
                i.lock().unwrap().push(f);
            }
        }
    });
    ready.recv_timeout(WAIT).expect("the sniffer opened");
    Seen { items, stop }
}

/// A packet socket for every ethertype (`ETH_P_ALL`) on one interface.
struct RawSocket(i32);

impl RawSocket {
    fn open(ifname: &str) -> Self {
        let c = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `c` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is owned by the returned value.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = all;
        sa.sll_ifindex = ifindex;
        // SAFETY: `sa` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Self(fd)
    }

    /// A frame, and whether the interface sent it (`PACKET_OUTGOING`).
    fn recv(&self) -> Option<(bool, Vec<u8>)> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is writable for its length, `from` for `len`.
        let n = unsafe {
            libc::recvfrom(
                self.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            (from.sll_pkttype == libc::PACKET_OUTGOING, buf)
        })
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and not used after this.
        unsafe { libc::close(self.0) };
    }
}

// ---- frames ----

type Mac = [u8; 6];

fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet of `proto` carrying `payload`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// A UDP datagram (no checksum, which IPv4 allows) in an IPv4 packet.
fn udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&40000u16.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    ipv4(src, dst, 17, &u)
}

/// An ICMP echo request with identifier `id`.
fn echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(b"runv-echo");
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, &m)
}

/// An ARP request: `sha`/`spa` asks who has `tpa`.
fn arp_request(sha: Mac, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa.octets());
    eth([0xff; 6], sha, 0x0806, &a)
}

/// Whether `frame` carries `needle` anywhere.
fn carries(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}

fn parse_mac(s: &str) -> Mac {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

// ---- the node ----

/// One relay VM as the agent wired it.
struct Vm {
    name: String,
    dir: VmDir,
    tap: String,
    mac: Mac,
    ip: Ipv4Addr,
}

/// An agent in its own node namespace with relay VMs, torn down on drop.
struct Node {
    // Dropped first: the VMMs end before their directories and namespace go.
    _guards: Vec<KillVmmOnDrop>,
    ns: Netns,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    manifests: PathBuf,
    agent: Option<Agent>,
    bridge_mac: Mac,
}

/// A relay VM's manifest: name, tenant, MAC.
fn relay_vm(name: &str, tenant: &str, mac: &str) -> String {
    common::manifest(name, "console=ttyS0 net=relay", "Always")
        + &format!(
            "  tenant: {{ name: {tenant} }}\n  interfaces:\n  - {{ name: eth0, type: Nat, mac: \"{mac}\" }}\n"
        )
}

impl Node {
    /// Starts an agent in a new namespace with the VMs `vms` (name, tenant,
    /// MAC) and waits until every one of `ready` is relaying.
    fn start(tag: &str, vms: &[(&str, &str, &str)], ready: &[&str]) -> Self {
        let ns = Netns::new(tag);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let manifests = tmp.path().join("vms.yaml");
        let docs: Vec<String> = vms.iter().map(|(n, t, m)| relay_vm(n, t, m)).collect();
        std::fs::write(&manifests, docs.join("---\n")).unwrap();
        let guards = vms
            .iter()
            .map(|(n, _, _)| KillVmmOnDrop(root.join(format!("vms/default_{n}"))))
            .collect();
        let mut node = Self {
            ns,
            _tmp: tmp,
            root,
            manifests,
            agent: None,
            bridge_mac: [0; 6],
            _guards: guards,
        };
        node.start_agent();
        for name in ready {
            node.wait_serial(name, "virtio-net relay ready", 1);
        }
        let link = node
            .ns
            .run("ip", &["-o", "link", "show", "dev", "runvbr0"])
            .unwrap();
        node.bridge_mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(parse_mac)
            .expect("the bridge's MAC");
        node
    }

    fn start_agent(&mut self) {
        let vmm = common::vmm_binary();
        let args = [
            "netns",
            "exec",
            &self.ns.0,
            env!("CARGO_BIN_EXE_runv-agent"),
            "--root",
            self.root.to_str().unwrap(),
            "--restart-backoff",
            "300s",
            "standalone",
            self.manifests.to_str().unwrap(),
            "--vmm",
            vmm.to_str().unwrap(),
        ];
        self.agent = Some(Agent::spawn(Path::new("ip"), &args, &[]));
    }

    /// Kills the agent (the VMs keep running).
    fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.signal(libc::SIGKILL);
            a.wait(WAIT);
        }
    }

    fn output(&self) -> String {
        self.agent.as_ref().map(Agent::output).unwrap_or_default()
    }

    /// Waits until the VM's serial log has `line` at least `count` times.
    fn wait_serial(&self, name: &str, line: &str, count: usize) {
        let log = self.root.join(format!("vms/default_{name}/serial.log"));
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches(line).count() >= count {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "{name}: {count} × {line:?} not in its serial log within {WAIT:?}:\n{text}\nagent:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VM as the agent recorded it (its network record).
    fn vm(&self, name: &str) -> Vm {
        let dir = VmDir::new(&self.root, "default", name);
        let rec = dir
            .read_net()
            .unwrap_or_else(|| panic!("{name} has no network record"));
        let i = &rec.interfaces[0];
        Vm {
            name: name.to_owned(),
            tap: i.tap.clone(),
            mac: parse_mac(&i.mac),
            ip: i.ip,
            dir,
        }
    }

    /// Has `vm`'s guest send `frame` through its tap, and waits until it did.
    fn relay(&self, vm: &Vm, frame: &[u8]) {
        let log = vm.dir.serial_log();
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("virtio-net relayed frame")
            .count();
        let mut payload = b"runv-relay:".to_vec();
        payload.extend_from_slice(frame);
        let carrier = eth(vm.mac, self.bridge_mac, ETHERTYPE, &payload);
        self.ns
            .within(move || PacketSocket::open("runvbr0").send(&carrier));
        self.wait_serial(&vm.name, "virtio-net relayed frame", before + 1);
    }

    /// Lets the node reach `vm` without asking it (the test guest answers
    /// no ARP).
    fn neighbour(&self, vm: &Vm) {
        let (ip, mac) = (vm.ip.to_string(), mac_text(&vm.mac));
        self.ns.ip(&[
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &mac,
            "dev",
            "runvbr0",
            "nud",
            "permanent",
        ]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
    }
}

fn mac_text(mac: &Mac) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// A UDP datagram from `vm` (its own MAC and address) to `dst` through the gateway.
fn from_vm(node: &Node, vm: &Vm, dst: Ipv4Addr, port: u16, data: &[u8]) -> Vec<u8> {
    eth(
        node.bridge_mac,
        vm.mac,
        0x0800,
        &udp(vm.ip, dst, port, data),
    )
}

fn got(seen: &Seen<(Ipv4Addr, Vec<u8>)>, data: &[u8]) -> bool {
    seen.all().iter().any(|(_, d)| d == data)
}

// ---- the rules ----

#[test]
fn a_vm_reaches_the_world_masqueraded_but_not_metadata_nor_cluster_addresses() {
    if !needs("a_vm_reaches_the_world_masqueraded_but_not_metadata_nor_cluster_addresses") {
        return;
    }
    let node = Node::start("dst", &[("eg-dst", "a", "02:e0:00:00:00:01")], &["eg-dst"]);
    let world = outside(&node.ns, "dst-out");
    let seen = udp_listener(&world, PORT);
    let vm = node.vm("eg-dst");

    node.relay(&vm, &from_vm(&node, &vm, METADATA, PORT, b"to-metadata"));
    node.relay(&vm, &from_vm(&node, &vm, CLUSTER, PORT, b"to-cluster"));
    node.relay(&vm, &from_vm(&node, &vm, WORLD, PORT, b"to-world"));

    seen.wait_for("the datagram to the world", |(_, d)| d == b"to-world");
    let (src, _) = seen
        .all()
        .into_iter()
        .find(|(_, d)| d == b"to-world")
        .unwrap();
    assert_eq!(src, NODE_UPLINK, "masqueraded to the node's address");
    assert!(!got(&seen, b"to-metadata"), "reached 169.254.169.254");
    assert!(!got(&seen, b"to-cluster"), "reached the cluster address");
}

#[test]
fn a_vm_reaches_only_echo_and_dns_on_the_node() {
    if !needs("a_vm_reaches_only_echo_and_dns_on_the_node") {
        return;
    }
    let node = Node::start(
        "node",
        &[("eg-node", "a", "02:e0:00:00:00:02")],
        &["eg-node"],
    );
    let _world = outside(&node.ns, "node-out");
    let metrics = udp_listener(&node.ns, 9090);
    let dns = udp_listener(&node.ns, 53);
    let vm = node.vm("eg-node");
    node.neighbour(&vm);
    let tap = sniffer(&node.ns, &vm.tap, Way::Out);

    node.relay(&vm, &from_vm(&node, &vm, GATEWAY, 9090, b"to-gateway-9090"));
    node.relay(
        &vm,
        &from_vm(&node, &vm, NODE_UPLINK, 9090, b"to-uplink-9090"),
    );
    node.relay(&vm, &from_vm(&node, &vm, GATEWAY, 53, b"dns-query"));
    let ping = eth(
        node.bridge_mac,
        vm.mac,
        0x0800,
        &echo(vm.ip, GATEWAY, 0x7e57),
    );

    dns.wait_for("the DNS datagram to the gateway", |(_, d)| {
        d == b"dns-query"
    });
    node.relay(&vm, &ping);
    tap.wait_for("the gateway's echo reply", |f| {
        f.len() > 34 && f[..6] == vm.mac && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0
    });
    assert!(
        metrics.all().is_empty(),
        "reached the node's port 9090: {:?}",
        metrics.all()
    );
}

#[test]
fn spoofed_sources_and_other_ethertypes_do_not_leave_the_tap() {
    if !needs("spoofed_sources_and_other_ethertypes_do_not_leave_the_tap") {
        return;
    }
    // The second VM asks for the first one's MAC: refused.
    let node = Node::start(
        "spoof",
        &[
            ("eg-spoof", "a", "02:e0:00:00:00:03"),
            ("eg-spoof-dup", "a", "02:e0:00:00:00:03"),
        ],
        &["eg-spoof"],
    );
    let world = outside(&node.ns, "spoof-out");
    let seen = udp_listener(&world, PORT);
    let bridge = sniffer(&node.ns, "runvbr0", Way::In);
    let vm = node.vm("eg-spoof");
    let other_ip = Ipv4Addr::new(10, 213, 0, 99);
    let other_mac = [0x02, 0xe0, 0, 0, 0, 0x99];

    let spoofed_ip = eth(
        node.bridge_mac,
        vm.mac,
        0x0800,
        &udp(other_ip, WORLD, PORT, b"spoofed-ip"),
    );
    let spoofed_mac = eth(
        node.bridge_mac,
        other_mac,
        0x0800,
        &udp(vm.ip, WORLD, PORT, b"spoofed-mac"),
    );
    let arp_lie = arp_request(vm.mac, other_ip, GATEWAY);
    let arp_truth = arp_request(vm.mac, vm.ip, GATEWAY);
    let ipv6 = eth(
        [0x33, 0x33, 0, 0, 0, 1],
        vm.mac,
        0x86dd,
        b"runv-ipv6-frame-body.......",
    );
    for f in [&spoofed_ip, &spoofed_mac, &arp_lie, &ipv6] {
        node.relay(&vm, f);
    }
    node.relay(&vm, &arp_truth);
    node.relay(&vm, &from_vm(&node, &vm, WORLD, PORT, b"honest"));

    seen.wait_for("the honest datagram", |(_, d)| d == b"honest");
    bridge.wait_for("the honest ARP request", |f| *f == arp_truth);
    assert!(
        !got(&seen, b"spoofed-ip"),
        "a spoofed source address left the node"
    );
    assert!(
        !got(&seen, b"spoofed-mac"),
        "a spoofed source MAC left the node"
    );
    let frames = bridge.all();
    assert!(
        !frames.iter().any(|f| carries(f, b"spoofed-")),
        "a spoofed frame reached the bridge"
    );
    assert!(
        !frames.contains(&arp_lie),
        "an ARP claiming another address reached the bridge"
    );
    assert!(
        !frames.iter().any(|f| carries(f, b"runv-ipv6-frame")),
        "IPv6 reached the bridge"
    );
    let out = node.output();
    assert!(
        out.contains(
            "eg-spoof-dup Warning StartFailed: spec.interfaces[eth0].mac: 02:e0:00:00:00:03 is \
             already the MAC of default/eg-spoof's interface eth0 on this node"
        ),
        "{out}"
    );
}

#[test]
fn tenants_have_no_path_to_each_other_on_the_bridge() {
    if !needs("tenants_have_no_path_to_each_other_on_the_bridge") {
        return;
    }
    let node = Node::start(
        "ten",
        &[
            ("eg-a1", "a", "02:e0:00:00:00:a1"),
            ("eg-a2", "a", "02:e0:00:00:00:a2"),
            ("eg-b1", "b", "02:e0:00:00:00:b1"),
        ],
        &["eg-a1", "eg-a2", "eg-b1"],
    );
    let (a1, a2, b1) = (node.vm("eg-a1"), node.vm("eg-a2"), node.vm("eg-b1"));
    node.neighbour(&a2);
    node.neighbour(&b1);
    let to_a2 = sniffer(&node.ns, &a2.tap, Way::Out);
    let to_b1 = sniffer(&node.ns, &b1.tap, Way::Out);
    // Layer 2: straight to the other guest's MAC, and a broadcast.
    let l2 = |dst: &Vm, data: &[u8]| eth(dst.mac, a1.mac, 0x0800, &udp(a1.ip, dst.ip, PORT, data));
    node.relay(&a1, &l2(&b1, b"l2-to-b1"));
    node.relay(
        &a1,
        &eth(
            [0xff; 6],
            a1.mac,
            0x0800,
            &udp(a1.ip, Ipv4Addr::BROADCAST, PORT, b"l2-broadcast"),
        ),
    );
    node.relay(&a1, &l2(&a2, b"l2-to-a2"));
    // Layer 3: through the gateway.
    node.relay(&a1, &from_vm(&node, &a1, b1.ip, PORT, b"l3-to-b1"));
    node.relay(&a1, &from_vm(&node, &a1, a2.ip, PORT, b"l3-to-a2"));

    to_a2.wait_for("the frame to the same tenant's VM", |f| {
        carries(f, b"l2-to-a2")
    });
    to_a2.wait_for("the broadcast, within the tenant", |f| {
        carries(f, b"l2-broadcast")
    });
    to_a2.wait_for("the routed datagram to the same tenant's VM", |f| {
        carries(f, b"l3-to-a2")
    });
    let at_b1 = to_b1.all();
    // Nor does tenant a's traffic to a2 spill over to b1 (the bridge has
    // not learnt a2's MAC: the test guests send nothing by themselves).
    for attack in [
        &b"l2-to-b1"[..],
        b"l2-broadcast",
        b"l3-to-b1",
        b"l2-to-a2",
        b"l3-to-a2",
    ] {
        assert!(
            !at_b1.iter().any(|f| carries(f, attack)),
            "{} reached the other tenant's VM",
            String::from_utf8_lossy(attack)
        );
    }
}

/// Deletes the agent's tables, as a node administrator's flush would.
fn delete_tables(ns: &Netns) {
    for family in ["bridge", "inet"] {
        assert!(
            ns.run("nft", &["delete", "table", family, "runv"])
                .is_some()
        );
    }
}

#[test]
fn after_the_tables_are_deleted_an_agent_restart_brings_the_rules_back() {
    if !needs("after_the_tables_are_deleted_an_agent_restart_brings_the_rules_back") {
        return;
    }
    let mut node = Node::start("rst", &[("eg-rst", "a", "02:e0:00:00:00:04")], &["eg-rst"]);
    let world = outside(&node.ns, "rst-out");
    let seen = udp_listener(&world, PORT);
    let vm = node.vm("eg-rst");

    // Without the tables the attack gets through: they are what stops it.
    delete_tables(&node.ns);
    node.relay(&vm, &from_vm(&node, &vm, METADATA, PORT, b"unguarded"));
    seen.wait_for("the datagram to metadata, unguarded", |(_, d)| {
        d == b"unguarded"
    });

    // The agent restarts (the VM keeps running); the rules are back.
    node.kill_agent();
    node.start_agent();
    let start = Instant::now();
    while node
        .ns
        .run("nft", &["list", "table", "inet", "runv"])
        .is_none()
    {
        assert!(
            start.elapsed() < WAIT,
            "no rules after the restart:\n{}",
            node.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    node.relay(&vm, &from_vm(&node, &vm, METADATA, PORT, b"guarded"));
    node.relay(&vm, &from_vm(&node, &vm, WORLD, PORT, b"after-restart"));
    seen.wait_for("the datagram to the world", |(_, d)| d == b"after-restart");
    assert!(
        !got(&seen, b"guarded"),
        "reached 169.254.169.254 after the restart"
    );
}
