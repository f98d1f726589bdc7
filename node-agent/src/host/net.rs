//! Real node networking through iproute2 (`ip`), `iptables` and `nft`,
//! optionally inside a network namespace (tests create their own).
//!
//! Why commands and not a netlink crate: the pieces needed are a bridge, an
//! address, persistent tap devices and a masquerade rule. `rtnetlink` covers
//! the first two but not persistent taps (TUNSETPERSIST is an ioctl) nor NAT
//! (netfilter has no well-kept Rust crate), so a crate would still leave two
//! of four steps to commands; iproute2 and iptables are the tools node
//! operators already read and debug with, and every call here is idempotent
//! and named in its error. What VMs may send is nftables' (see
//! [`super::egress`] for why): the ruleset goes to `nft -f -` whole. This
//! module must not choose names, addresses or rules.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::{BridgeSpec, HostError, Network, check_ifname};

/// Networking through `ip` and `iptables`.
#[derive(Debug, Default, Clone)]
pub struct IpNetwork {
    netns: Option<String>,
}

impl IpNetwork {
    /// Networking in `netns` (`None`: the agent's own namespace).
    pub fn new(netns: Option<String>) -> Self {
        Self { netns }
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String, HostError> {
        let mut cmd = self.command(program);
        cmd.args(args);
        let line = format!("{program} {}", args.join(" "));
        let out = cmd
            .output()
            .map_err(|e| HostError::io("running", program, e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(HostError::Command {
                command: line,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Runs `program args` with `input` on its stdin.
    fn run_with_input(&self, program: &str, args: &[&str], input: &str) -> Result<(), HostError> {
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HostError::io("running", program, e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A failed write shows as the program's own failure below.
            let _ = stdin.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| HostError::io("waiting for", program, e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(HostError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    fn succeeds(&self, program: &str, args: &[&str]) -> bool {
        self.run(program, args).is_ok()
    }

    /// Appends an iptables rule unless it is already there (`-C` checks).
    fn ensure_rule(&self, table: &str, chain: &str, rule: &[&str]) -> Result<(), HostError> {
        let mut check = vec!["-w", "-t", table, "-C", chain];
        check.extend_from_slice(rule);
        if self.succeeds("iptables", &check) {
            return Ok(());
        }
        let mut add = vec!["-w", "-t", table, "-A", chain];
        add.extend_from_slice(rule);
        self.run("iptables", &add).map(drop)
    }
}

impl Network for IpNetwork {
    fn ensure_bridge(&self, bridge: &BridgeSpec) -> Result<(), HostError> {
        check_ifname(&bridge.name)?;
        let br = bridge.name.as_str();
        if !self.link_exists(br) {
            self.run("ip", &["link", "add", "name", br, "type", "bridge"])?;
        } else if !self.is_bridge(br) {
            // Someone else's device under the bridge's name (a tap squatting
            // it): never give it the gateway address nor NAT rules.
            return Err(HostError::Invalid {
                what: "node bridge",
                value: format!("{br} exists and is not a bridge"),
            });
        }
        let addr = format!("{}/{}", bridge.gateway, bridge.prefix);
        self.run("ip", &["addr", "replace", &addr, "dev", br])?;
        self.run("ip", &["link", "set", br, "up"])?;
        self.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
        let mask = u32::MAX << (32 - u32::from(bridge.prefix));
        let subnet = format!(
            "{}/{}",
            std::net::Ipv4Addr::from(u32::from(bridge.gateway) & mask),
            bridge.prefix
        );
        self.ensure_rule(
            "nat",
            "POSTROUTING",
            &["-s", &subnet, "!", "-o", br, "-j", "MASQUERADE"],
        )?;
        self.ensure_rule("filter", "FORWARD", &["-i", br, "-j", "ACCEPT"])?;
        self.ensure_rule(
            "filter",
            "FORWARD",
            &[
                "-o",
                br,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        )
    }

    fn ensure_tap(&self, tap: &str, bridge: &str) -> Result<(), HostError> {
        check_ifname(tap)?;
        check_ifname(bridge)?;
        if !self.link_exists(tap) {
            self.run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])?;
        }
        self.run("ip", &["link", "set", tap, "master", bridge])?;
        self.run("ip", &["link", "set", tap, "up"]).map(drop)
    }

    fn delete_tap(&self, tap: &str) -> Result<(), HostError> {
        check_ifname(tap)?;
        if !self.link_exists(tap) {
            return Ok(());
        }
        self.run("ip", &["link", "del", "dev", tap]).map(drop)
    }

    fn link_exists(&self, name: &str) -> bool {
        check_ifname(name).is_ok() && self.succeeds("ip", &["link", "show", "dev", name])
    }

    fn apply_egress(&self, ruleset: &str) -> Result<(), HostError> {
        self.run_with_input("nft", &["-f", "-"], ruleset)
    }
}

impl IpNetwork {
    /// Whether link `name` is a bridge (`ip -d link` says `bridge` as its kind).
    fn is_bridge(&self, name: &str) -> bool {
        self.run("ip", &["-d", "-o", "link", "show", "dev", name])
            .is_ok_and(|out| out.split_whitespace().any(|w| w == "bridge"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing::{Need, require};

    /// A network namespace of the test's own, deleted on drop.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Self {
            let name = format!("runv-{tag}-{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .unwrap();
            assert!(out.status.success(), "ip netns add: {out:?}");
            Self(name)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    #[test]
    fn bridge_tap_and_nat_in_a_namespace() {
        if !require(
            "bridge_tap_and_nat_in_a_namespace",
            &[Need::Root, Need::Tun, Need::Iptables],
        ) {
            return;
        }
        let ns = Netns::new("net");
        let net = IpNetwork::new(Some(ns.0.clone()));
        let br = BridgeSpec {
            name: "runvbr0".into(),
            gateway: "10.213.0.1".parse().unwrap(),
            prefix: 24,
        };
        net.ensure_bridge(&br).unwrap();
        net.ensure_bridge(&br).unwrap(); // idempotent
        let addrs = net
            .run("ip", &["-o", "addr", "show", "dev", "runvbr0"])
            .unwrap();
        assert!(addrs.contains("10.213.0.1/24"), "{addrs}");
        let nat = net
            .run("iptables", &["-w", "-t", "nat", "-S", "POSTROUTING"])
            .unwrap();
        assert_eq!(
            nat.matches("-s 10.213.0.0/24 ! -o runvbr0 -j MASQUERADE")
                .count(),
            1,
            "one rule after two calls: {nat}"
        );
        net.ensure_tap("runvtap-a", "runvbr0").unwrap();
        net.ensure_tap("runvtap-a", "runvbr0").unwrap();
        let link = net
            .run("ip", &["-o", "link", "show", "dev", "runvtap-a"])
            .unwrap();
        assert!(link.contains("master runvbr0"), "{link}");
        assert!(net.link_exists("runvtap-a"));
        net.delete_tap("runvtap-a").unwrap();
        assert!(!net.link_exists("runvtap-a"));
        net.delete_tap("runvtap-a").unwrap();
        assert!(net.ensure_tap("bad name", "runvbr0").is_err());
    }

    #[test]
    fn a_device_squatting_the_bridge_name_is_not_taken_for_the_bridge() {
        if !require(
            "a_device_squatting_the_bridge_name_is_not_taken_for_the_bridge",
            &[Need::Root, Need::Tun, Need::Iptables],
        ) {
            return;
        }
        let ns = Netns::new("squat");
        let net = IpNetwork::new(Some(ns.0.clone()));
        // A tenant's tap created under the bridge's name before the agent ran.
        net.run("ip", &["tuntap", "add", "dev", "runvbr0", "mode", "tap"])
            .unwrap();
        let br = BridgeSpec {
            name: "runvbr0".into(),
            gateway: "10.213.0.1".parse().unwrap(),
            prefix: 24,
        };
        let e = net.ensure_bridge(&br).unwrap_err();
        assert!(
            e.to_string().contains("runvbr0 exists and is not a bridge"),
            "{e}"
        );
        let addrs = net
            .run("ip", &["-o", "addr", "show", "dev", "runvbr0"])
            .unwrap();
        assert!(
            !addrs.contains("10.213.0.1"),
            "the gateway went to the tap: {addrs}"
        );
    }

    #[test]
    fn the_egress_rules_replace_only_the_agents_tables_in_one_apply() {
        use crate::host::egress::{EgressPolicy, Port, render};
        if !require(
            "the_egress_rules_replace_only_the_agents_tables_in_one_apply",
            &[Need::Root, Need::Nft],
        ) {
            return;
        }
        let ns = Netns::new("nft");
        let net = IpNetwork::new(Some(ns.0.clone()));
        // Someone else's table, which must survive every apply.
        net.run_with_input(
            "nft",
            &["-f", "-"],
            "table inet other {\n chain c {\n }\n}\n",
        )
        .unwrap();
        let br = BridgeSpec {
            name: "runvbr0".into(),
            gateway: "10.213.0.1".parse().unwrap(),
            prefix: 16,
        };
        let port = |tap: &str, last: u8, tenant: &str| Port {
            tap: tap.into(),
            mac: [2, 0, 0, 0, 0, last],
            ip: std::net::Ipv4Addr::new(10, 213, 0, last),
            tenant: tenant.into(),
        };
        let two = [port("rva-0", 2, "a"), port("rvb-0", 3, "b")];
        let policy = EgressPolicy::default();
        net.apply_egress(&render(&br, &policy, &two).unwrap())
            .unwrap();
        net.apply_egress(&render(&br, &policy, &two).unwrap())
            .unwrap();
        let list = net.run("nft", &["list", "ruleset"]).unwrap();
        assert_eq!(list.matches("chain port").count(), 2, "{list}");
        assert!(list.contains("table inet other"), "{list}");
        // One port fewer, and a ruleset that fails: the tables stay whole.
        net.apply_egress(&render(&br, &policy, &two[..1]).unwrap())
            .unwrap();
        let bad =
            render(&br, &policy, &two[..1]).unwrap() + "table inet runv { chain x { nonsense } }\n";
        assert!(net.apply_egress(&bad).is_err());
        let list = net.run("nft", &["list", "ruleset"]).unwrap();
        assert_eq!(list.matches("chain port").count(), 1, "{list}");
        assert!(list.contains("elements = { 10.0.0.0/8,"), "{list}");
        // Deleted by someone: the next apply has it back.
        net.run("nft", &["delete", "table", "bridge", "runv"])
            .unwrap();
        net.apply_egress(&render(&br, &policy, &two).unwrap())
            .unwrap();
        let list = net
            .run("nft", &["list", "table", "bridge", "runv"])
            .unwrap();
        assert_eq!(list.matches("chain port").count(), 2, "{list}");
    }
}
