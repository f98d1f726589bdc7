//! `Nat` networking with the real agent and VMM, inside a network namespace
//! the test creates (so the bridge, tap and iptables rules touch nothing of
//! the host; it is deleted at the end, failed or not). `runv-agent standalone`
//! runs under `ip netns exec` with a MicroVM that has one `Nat` interface: its
//! tap is on the node bridge, its address comes from the IPAM and reaches the
//! guest's command line and the status, and the test guest's virtio-net step
//! answers a frame the test sends through the bridge. Deleting the VM (the
//! runtime's cleanup, what cluster mode's finalizer runs) removes the tap,
//! releases the address and removes the state directory.
//!
//! Needs root, /dev/kvm, /dev/net/tun, `ip` and `iptables`.

mod common;
#[path = "../../vmm/tests/common/packet.rs"]
mod packet;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, KillVmmOnDrop, TEST_CGROUP_PARENT, vmm_binary};
use packet::{ETHERTYPE, PacketSocket};
use runv_node_agent::testing::{Need, require};
use runv_node_agent::vmconfig;

const WAIT: Duration = Duration::from_secs(60);

/// A network namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("runv-nat-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip");
        assert!(out.status.success(), "ip netns add: {out:?}");
        Self(name)
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
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// Sends the test guest's ping through the bridge `bridge` of namespace `ns`
/// (from a thread that enters it) until the guest answers; returns the answer.
fn ping_guest_through(ns: &str, bridge: &str, bridge_mac: [u8; 6], guest_mac: [u8; 6]) -> Vec<u8> {
    let ns = ns.to_owned();
    let bridge = bridge.to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns(2) with a namespace fd we opened; it moves only this
        // thread (network namespaces are per thread), which ends below.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let sock = PacketSocket::open(&bridge);
        let mut ping = Vec::new();
        ping.extend_from_slice(&guest_mac);
        ping.extend_from_slice(&bridge_mac);
        ping.extend_from_slice(&ETHERTYPE.to_be_bytes());
        ping.extend_from_slice(b"runv-host-ping");
        let start = Instant::now();
        while start.elapsed() < WAIT {
            sock.send(&ping);
            while let Some(f) = sock.recv() {
                if f.len() >= 14 && f[6..12] == guest_mac {
                    return f;
                }
            }
        }
        panic!("no answer from the guest through {bridge} within {WAIT:?}");
    })
    .join()
    .expect("the ping thread")
}

fn wait_until(what: &str, agent: &Agent, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; agent output:\n{}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_nat_vm_gets_a_tap_on_the_bridge_and_an_address_and_deletion_frees_them() {
    if !require(
        "a_nat_vm_gets_a_tap_on_the_bridge_and_an_address_and_deletion_frees_them",
        &[Need::Root, Need::Kvm, Need::Tun, Need::Iptables, Need::Nft],
    ) {
        return;
    }
    let started = Instant::now();
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let vm_dir = root.join("vms/default_nat");
    let _vmm_guard = KillVmmOnDrop(vm_dir.clone());
    // No `test=`: the guest runs its device steps; virtio-net waits for the
    // host's frame, answers it, then the guest powers off. Always, with a
    // backoff long enough that it stays down for the rest of the test.
    let file = tmp.path().join("nat.yaml");
    std::fs::write(
        &file,
        common::manifest("nat", "console=ttyS0", "Always")
            + "  interfaces:\n  - { name: eth0, type: Nat }\n",
    )
    .unwrap();
    let vmm = vmm_binary();
    let agent_bin = env!("CARGO_BIN_EXE_runv-agent");
    let mut agent = Agent::spawn(
        std::path::Path::new("ip"),
        &[
            "netns",
            "exec",
            &ns.0,
            agent_bin,
            "--root",
            root.to_str().unwrap(),
            "--restart-backoff",
            "300s",
            "standalone",
            file.to_str().unwrap(),
            "--vmm",
            vmm.to_str().unwrap(),
        ],
        &[],
    );
    let tap = vmconfig::tap_name("default", "nat", 0);
    wait_until("the tap", &agent, || {
        ns.run("ip", &["link", "show", "dev", &tap]).is_some()
    });
    let bridge_link = ns
        .run("ip", &["-o", "link", "show", "dev", "runvbr0"])
        .unwrap();
    let bridge_mac = bridge_link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(parse_mac)
        .expect("the bridge's MAC");
    let guest_mac_text = vmconfig::default_mac("default", "nat", "eth0");
    let guest_mac = parse_mac(&guest_mac_text);

    // A frame through the bridge reaches the guest's virtio-net and back.
    let pong = ping_guest_through(&ns.0, "runvbr0", bridge_mac, guest_mac);
    assert_eq!(
        &pong[..6],
        &bridge_mac,
        "the answer goes back to the sender"
    );
    assert_eq!(&pong[14..], b"runv-guest-pong");
    agent.wait_for("nat | runv-guest: virtio-net sent pong", WAIT);
    let out = agent.output();
    assert!(
        out.contains(&format!(
            "nat | runv-guest: virtio-net mac={guest_mac_text}"
        )),
        "{out}"
    );
    assert!(
        out.contains("nat | runv-guest: virtio-net got runv-host-ping"),
        "{out}"
    );

    // The tap is on the bridge; the bridge has the gateway and NAT.
    let link = ns.run("ip", &["-o", "link", "show", "dev", &tap]).unwrap();
    assert!(link.contains("master runvbr0"), "{link}");
    let addrs = ns
        .run("ip", &["-o", "addr", "show", "dev", "runvbr0"])
        .unwrap();
    assert!(addrs.contains("10.213.0.1/16"), "{addrs}");
    let nat = ns
        .run("iptables", &["-w", "-t", "nat", "-S", "POSTROUTING"])
        .unwrap();
    assert!(
        nat.contains("-s 10.213.0.0/16 ! -o runvbr0 -j MASQUERADE"),
        "{nat}"
    );

    // The address: from the IPAM, in the status and on the guest's command line.
    let ipam_path = root.join("ipam.json");
    let ipam = std::fs::read_to_string(&ipam_path).unwrap();
    let leases: serde_json::Value = serde_json::from_str(&ipam).unwrap();
    let ip = leases
        .as_object()
        .and_then(|o| o.get("leases"))
        .and_then(|l| l.as_object())
        .and_then(|l| {
            l.iter()
                .find(|(_, owner)| owner.as_str() == Some("default/nat/eth0"))
                .map(|(ip, _)| ip.clone())
        })
        .unwrap_or_else(|| panic!("no lease for default/nat/eth0 in {ipam}"));
    assert_eq!(ip, "10.213.0.2", "the lowest free address");
    assert!(
        out.lines()
            .any(|l| l.starts_with("nat status") && l.contains(&format!("ip={ip}"))),
        "{out}"
    );
    assert!(
        out.contains(&format!("ip={ip}::10.213.0.1:255.255.0.0::eth0:off")),
        "the guest's command line carries the address: {out}"
    );

    // The guest powers off after its device steps; the VM keeps its tap and address.
    agent.wait_for("nat Normal Exited: VM exited: GuestPowerOff", WAIT);
    assert!(ns.run("ip", &["link", "show", "dev", &tap]).is_some());

    // The agent goes away (kill -9); then the VM is deleted.
    agent.signal(libc::SIGKILL);
    agent.wait(WAIT);
    let rt = common::delete_vm(&root, &vmm, Some(ns.0.clone()), TEST_CGROUP_PARENT, "nat");
    assert!(
        ns.run("ip", &["link", "show", "dev", &tap]).is_none(),
        "the tap is left"
    );
    let ipam = std::fs::read_to_string(&ipam_path).unwrap();
    assert!(
        !ipam.contains(&ip) && !ipam.contains("default/nat/"),
        "the address is still leased: {ipam}"
    );
    assert!(!vm_dir.exists(), "the state directory is left");
    // The next VM gets the address back.
    assert_eq!(
        rt.ipam().allocate("default/next/eth0").unwrap().to_string(),
        ip
    );
    eprintln!(
        "nat: tap, bridge, address and deletion checked in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
