//! The kernel's rules for what a `Nat` VM may send: rendered here, as one
//! nftables ruleset, from the agent's own records (the ports below), and
//! applied by [`super::Network::apply_egress`].
//!
//! Why nftables and not iptables: its `bridge` family filters frames between
//! the bridge's ports as such (source MAC, ARP fields, ethertype, which port
//! to which port) without `br_netfilter`, which would send every bridged
//! frame of every bridge on the node through the IP hooks; and `nft -f`
//! replaces whole tables in one transaction, so there is never a moment with
//! half a ruleset, and applying the same text twice changes nothing. The
//! agent owns two tables, `bridge runv` and `inet runv`, and never touches
//! another: each apply is "create, delete, create again" of exactly those
//! two, so a flushed or deleted table comes back whole.
//!
//! What the rules say (each a chain below):
//! - a frame from a VM's tap carries that VM's MAC as source; IPv4 carries
//!   its address; ARP claims only its MAC and address; the test guests'
//!   ethertype 0x88b5 passes; every other ethertype (IPv6 among them: the
//!   agent assigns none) is dropped, and so is anything from an `rv` tap the
//!   records do not name;
//! - frames go from port to port only between taps of one tenant, and a
//!   unicast frame leaves the bridge through a tap only when it is addressed
//!   to that tap's VM (so a frame for a VM the bridge has not learnt, or has
//!   forgotten, is not flooded to the others);
//! - from the VMs to the node itself (any of its addresses): only ICMP echo
//!   and DNS to the gateway, and return traffic;
//! - forwarded by the node: nothing between VMs of different tenants, and
//!   nothing to the denied CIDRs (link-local always among them) unless an
//!   allowed CIDR names it, before or after DNAT; no IPv6.
//!
//! Where `br_netfilter` is loaded (Kubernetes nodes load it), bridged IPv4
//! frames pass the `inet` forward hook too, with the bridge as both
//! interfaces: there the VM-to-VM chain lets broadcast and multicast by
//! (the kernel routes neither, so only bridged frames carry them) and
//! leaves the port-to-port decision to the `bridge` table.
//!
//! This module renders text and parses CIDRs; it runs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::{BridgeSpec, check_ifname};

/// The agent's nftables tables (family, name).
pub const TABLES: [(&str, &str); 2] = [("bridge", "runv"), ("inet", "runv")];

/// Destinations VMs may not reach by default: link-local (cloud metadata),
/// the private ranges node, pod and service networks live in, shared address
/// space, loopback and multicast.
pub const DEFAULT_DENY: [&str; 7] = [
    "169.254.0.0/16",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "224.0.0.0/4",
];

/// Link-local, denied whatever the deny list says (only an allowed CIDR
/// opens it).
const LINK_LOCAL: Cidr = Cidr {
    network: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
};

/// Why egress rules cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    /// A CIDR (an agent flag) cannot be read.
    #[error("{0:?} is not an IPv4 CIDR such as 10.0.0.0/8")]
    Cidr(String),
    /// A recorded tap name cannot go into a rule.
    #[error("tap device {0:?} cannot be named in a rule")]
    Tap(String),
}

/// An IPv4 network, `a.b.c.d/n`, kept masked to its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length, 0 to 32.
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = EgressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EgressError::Cidr(s.to_owned());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Where VMs may send beyond the node (the administrator's flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Destinations refused (link-local is added whatever this says).
    pub deny: Vec<Cidr>,
    /// Exceptions to `deny`.
    pub allow: Vec<Cidr>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            deny: DEFAULT_DENY.iter().filter_map(|c| c.parse().ok()).collect(),
            allow: Vec::new(),
        }
    }
}

/// One VM interface on the bridge, as the agent recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Its tap device (a port of the bridge).
    pub tap: String,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// Who the VM belongs to: ports of one tenant reach each other.
    pub tenant: String,
}

fn mac_text(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// `{ a, b }` of quoted names or bare values.
fn set<T: std::fmt::Display>(items: impl IntoIterator<Item = T>, quote: bool) -> String {
    let items: Vec<String> = items
        .into_iter()
        .map(|i| {
            if quote {
                format!("\"{i}\"")
            } else {
                i.to_string()
            }
        })
        .collect();
    format!("{{ {} }}", items.join(", "))
}

/// The whole ruleset for `ports` on `bridge`: the text `nft -f -` applies in
/// one transaction, replacing the agent's two tables (see the module doc).
pub fn render(
    bridge: &BridgeSpec,
    policy: &EgressPolicy,
    ports: &[Port],
) -> Result<String, EgressError> {
    for p in ports {
        if check_ifname(&p.tap).is_err() {
            return Err(EgressError::Tap(p.tap.clone()));
        }
    }
    // Bridge names are checked when the bridge is made; never quote one
    // that would not be.
    if check_ifname(&bridge.name).is_err() {
        return Err(EgressError::Tap(bridge.name.clone()));
    }
    let mut out = String::new();
    for (family, name) in TABLES {
        // Create (so the delete cannot fail), delete, create whole.
        let _ = writeln!(out, "table {family} {name}\ndelete table {family} {name}");
    }
    out.push_str(&render_bridge(ports));
    out.push_str(&render_inet(bridge, policy, ports));
    Ok(out)
}

/// The ports of each tenant, by tenant.
fn by_tenant(ports: &[Port]) -> BTreeMap<&str, Vec<&Port>> {
    let mut out: BTreeMap<&str, Vec<&Port>> = BTreeMap::new();
    for p in ports {
        out.entry(p.tenant.as_str()).or_default().push(p);
    }
    out
}

/// `table bridge runv`: per-port anti-spoofing, and port-to-port forwarding
/// only within a tenant.
fn render_bridge(ports: &[Port]) -> String {
    let mut out = String::from("table bridge runv {\n  chain prerouting {\n");
    out.push_str("    type filter hook prerouting priority filter; policy accept;\n");
    for (i, p) in ports.iter().enumerate() {
        let _ = writeln!(out, "    iifname \"{}\" jump port{i}", p.tap);
    }
    out.push_str("    iifname \"rv*\" counter drop\n  }\n");
    for (i, p) in ports.iter().enumerate() {
        let (mac, ip) = (mac_text(&p.mac), p.ip);
        let _ = write!(
            out,
            "  chain port{i} {{\n    ether saddr != {mac} counter drop\n    \
             ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
             arp saddr ether {mac} arp saddr ip {ip} accept\n    \
             ether type ip ip saddr {ip} accept\n    \
             ether type 0x88b5 accept\n    counter drop\n  }}\n"
        );
    }
    out.push_str("  chain forward {\n");
    out.push_str("    type filter hook forward priority filter; policy accept;\n");
    for group in by_tenant(ports).values() {
        let taps: BTreeSet<&str> = group.iter().map(|p| p.tap.as_str()).collect();
        let taps = set(taps, true);
        let _ = writeln!(out, "    iifname {taps} oifname {taps} accept");
    }
    out.push_str("    iifname \"rv*\" counter drop\n  }\n");
    out.push_str("  chain postrouting {\n");
    out.push_str("    type filter hook postrouting priority filter; policy accept;\n");
    for p in ports {
        let _ = write!(
            out,
            "    oifname \"{tap}\" ether daddr != {mac} \
             ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 counter drop\n    \
             oifname \"{tap}\" accept\n",
            tap = p.tap,
            mac = mac_text(&p.mac)
        );
    }
    out.push_str("    oifname \"rv*\" counter drop\n  }\n}\n");
    out
}

/// `table inet runv`: what VMs may send to the node itself, between each
/// other through the gateway, and beyond the node.
fn render_inet(bridge: &BridgeSpec, policy: &EgressPolicy, ports: &[Port]) -> String {
    let (br, gw) = (&bridge.name, bridge.gateway);
    let mut deny: BTreeSet<Cidr> = policy.deny.iter().copied().collect();
    deny.insert(LINK_LOCAL);
    let allow: BTreeSet<Cidr> = policy.allow.iter().copied().collect();
    let mut out = String::from("table inet runv {\n");
    let _ = writeln!(
        out,
        "  set deny {{ type ipv4_addr; flags interval; auto-merge; elements = {} }}",
        set(&deny, false)
    );
    out.push_str("  set allow { type ipv4_addr; flags interval; auto-merge; ");
    if !allow.is_empty() {
        let _ = write!(out, "elements = {} ", set(&allow, false));
    }
    out.push_str("}\n");
    let _ = write!(
        out,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    \
         iifname \"{br}\" jump vms_to_node\n  }}\n  \
         chain vms_to_node {{\n    ct state established,related accept\n    \
         meta nfproto ipv6 counter drop\n    \
         ip daddr {gw} icmp type echo-request accept\n    \
         ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 accept\n    \
         counter drop\n  }}\n  \
         chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
         iifname \"{br}\" jump vms_forward\n  }}\n  \
         chain vms_forward {{\n    meta nfproto ipv6 counter drop\n    \
         oifname \"{br}\" jump between_vms\n    \
         ct state established,related accept\n    \
         ip daddr @deny ip daddr != @allow counter drop\n    \
         ct original ip daddr @deny ct original ip daddr != @allow counter drop\n  }}\n  \
         chain between_vms {{\n"
    );
    for group in by_tenant(ports).values() {
        let ips = set(group.iter().map(|p| p.ip).collect::<BTreeSet<_>>(), false);
        let _ = writeln!(out, "    ip saddr {ips} ip daddr {ips} accept");
    }
    let host_bits = u32::MAX.checked_shr(u32::from(bridge.prefix)).unwrap_or(0);
    let subnet_broadcast = Ipv4Addr::from(u32::from(gw) | host_bits);
    let _ = writeln!(
        out,
        "    ip daddr {{ 255.255.255.255, {subnet_broadcast}, 224.0.0.0/4 }} accept"
    );
    out.push_str("    counter drop\n  }\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge() -> BridgeSpec {
        BridgeSpec {
            name: "runvbr0".into(),
            gateway: Ipv4Addr::new(10, 213, 0, 1),
            prefix: 16,
        }
    }

    fn port(tap: &str, last: u8, tenant: &str) -> Port {
        Port {
            tap: tap.into(),
            mac: [2, 0, 0, 0, 0, last],
            ip: Ipv4Addr::new(10, 213, 0, last),
            tenant: tenant.into(),
        }
    }

    /// The lines of chain `name` of the ruleset (between its `{` and `}`).
    fn chain<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let head = format!("chain {name} {{");
        text.lines()
            .skip_while(|l| l.trim() != head)
            .skip(1)
            .take_while(|l| l.trim() != "}")
            .map(str::trim)
            .collect()
    }

    #[test]
    fn cidrs_are_read_masked_and_refused_when_not_ipv4() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix, 0);
        assert_eq!(
            "1.2.3.4/32".parse::<Cidr>().unwrap().to_string(),
            "1.2.3.4/32"
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/8",
            "x/8",
            "10.0.0.0/-1",
            "",
        ] {
            assert_eq!(
                bad.parse::<Cidr>(),
                Err(EgressError::Cidr(bad.into())),
                "{bad}"
            );
        }
        let d = EgressPolicy::default();
        assert_eq!(d.deny.len(), DEFAULT_DENY.len());
        assert!(d.allow.is_empty());
    }

    #[test]
    fn both_tables_are_replaced_in_one_text() {
        let text = render(&bridge(), &EgressPolicy::default(), &[]).unwrap();
        let head: Vec<&str> = text.lines().take(4).collect();
        assert_eq!(
            head,
            [
                "table bridge runv",
                "delete table bridge runv",
                "table inet runv",
                "delete table inet runv"
            ]
        );
        assert_eq!(text.matches("table bridge runv {").count(), 1);
        assert_eq!(text.matches("table inet runv {").count(), 1);
        // No other table is named.
        for line in text.lines().filter(|l| l.contains("table ")) {
            assert!(line.contains(" runv"), "{line}");
        }
    }

    #[test]
    fn each_port_sends_only_its_own_mac_and_address() {
        let ports = [port("rva-0", 2, "a"), port("rvb-0", 3, "b")];
        let text = render(&bridge(), &EgressPolicy::default(), &ports).unwrap();
        let pre = chain(&text, "prerouting");
        assert_eq!(
            pre,
            [
                "type filter hook prerouting priority filter; policy accept;",
                "iifname \"rva-0\" jump port0",
                "iifname \"rvb-0\" jump port1",
                "iifname \"rv*\" counter drop",
            ],
            "an unrecorded rv tap sends nothing"
        );
        let p1 = chain(&text, "port1");
        assert_eq!(p1[0], "ether saddr != 02:00:00:00:00:03 counter drop");
        assert!(p1[1].contains("arp saddr ether 02:00:00:00:00:03 arp saddr ip 10.213.0.3 accept"));
        assert_eq!(p1[2], "ether type ip ip saddr 10.213.0.3 accept");
        assert_eq!(p1[3], "ether type 0x88b5 accept");
        assert_eq!(p1[4], "counter drop", "IPv6 and every other ethertype");
        assert_eq!(p1.len(), 5);
        let post = chain(&text, "postrouting");
        assert_eq!(
            &post[3..],
            [
                "oifname \"rvb-0\" ether daddr != 02:00:00:00:00:03 \
                 ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 counter drop",
                "oifname \"rvb-0\" accept",
                "oifname \"rv*\" counter drop",
            ],
            "unicast out of a tap only to its own VM"
        );
    }

    #[test]
    fn ports_reach_each_other_only_within_a_tenant() {
        let ports = [
            port("rva-0", 2, "a"),
            port("rvb-0", 3, "b"),
            port("rva2-0", 4, "a"),
        ];
        let text = render(&bridge(), &EgressPolicy::default(), &ports).unwrap();
        let fwd = chain(&text, "forward");
        assert_eq!(
            &fwd[1..],
            [
                "iifname { \"rva-0\", \"rva2-0\" } oifname { \"rva-0\", \"rva2-0\" } accept",
                "iifname { \"rvb-0\" } oifname { \"rvb-0\" } accept",
                "iifname \"rv*\" counter drop",
            ]
        );
        let between = chain(&text, "between_vms");
        assert_eq!(
            between,
            [
                "ip saddr { 10.213.0.2, 10.213.0.4 } ip daddr { 10.213.0.2, 10.213.0.4 } accept",
                "ip saddr { 10.213.0.3 } ip daddr { 10.213.0.3 } accept",
                "ip daddr { 255.255.255.255, 10.213.255.255, 224.0.0.0/4 } accept",
                "counter drop",
            ]
        );
    }

    #[test]
    fn the_node_answers_only_echo_and_dns_on_the_gateway() {
        let text = render(&bridge(), &EgressPolicy::default(), &[]).unwrap();
        assert_eq!(
            chain(&text, "input")[1],
            "iifname \"runvbr0\" jump vms_to_node"
        );
        assert_eq!(
            chain(&text, "vms_to_node"),
            [
                "ct state established,related accept",
                "meta nfproto ipv6 counter drop",
                "ip daddr 10.213.0.1 icmp type echo-request accept",
                "ip daddr 10.213.0.1 meta l4proto { tcp, udp } th dport 53 accept",
                "counter drop",
            ]
        );
    }

    #[test]
    fn denied_destinations_keep_link_local_and_yield_to_allowed_ones() {
        let policy = EgressPolicy {
            deny: vec!["10.0.0.0/8".parse().unwrap()],
            allow: vec!["10.1.0.0/16".parse().unwrap()],
        };
        let text = render(&bridge(), &policy, &[]).unwrap();
        assert!(text.contains(
            "set deny { type ipv4_addr; flags interval; auto-merge; elements = { 10.0.0.0/8, 169.254.0.0/16 } }"
        ), "{text}");
        assert!(text.contains("elements = { 10.1.0.0/16 }"), "{text}");
        let fwd = chain(&text, "vms_forward");
        assert_eq!(
            fwd,
            [
                "meta nfproto ipv6 counter drop",
                "oifname \"runvbr0\" jump between_vms",
                "ct state established,related accept",
                "ip daddr @deny ip daddr != @allow counter drop",
                "ct original ip daddr @deny ct original ip daddr != @allow counter drop",
            ],
            "VM to VM is decided by tenant before anything else"
        );
        let none = render(
            &bridge(),
            &EgressPolicy {
                deny: vec![],
                allow: vec![],
            },
            &[],
        )
        .unwrap();
        assert!(none.contains("elements = { 169.254.0.0/16 }"), "{none}");
        assert!(none.contains("set allow { type ipv4_addr; flags interval; auto-merge; }"));
    }

    #[test]
    fn a_name_that_cannot_be_quoted_is_refused() {
        let bad = port("rv\" accept #", 2, "a");
        assert_eq!(
            render(&bridge(), &EgressPolicy::default(), &[bad]),
            Err(EgressError::Tap("rv\" accept #".into()))
        );
    }
}
