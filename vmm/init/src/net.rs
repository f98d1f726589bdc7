//! The guest's network: `lo` up, the assigned interface up with its
//! address and default route, and the files that name them
//! (`/etc/hosts`, `/etc/resolv.conf`, rendered here, pure).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use runv_vmm_api::guest::GuestNetwork;

use crate::Fatal;

/// An address with its prefix length, `10.1.0.5/24`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((ip.parse().ok()?, len))
}

fn netmask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0))
}

/// `/etc/hosts`: localhost, and the hostname on the VM's address.
pub fn hosts(hostname: &str, net: Option<&GuestNetwork>) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    match net.and_then(|n| parse_cidr(&n.address)) {
        Some((ip, _)) => s.push_str(&format!("{ip}\t{hostname}\n")),
        None => s.push_str(&format!("127.0.1.1\t{hostname}\n")),
    }
    s
}

/// `/etc/resolv.conf` from the assigned name servers and search domains.
pub fn resolv_conf(net: Option<&GuestNetwork>) -> String {
    let mut s = String::new();
    if let Some(n) = net {
        if !n.search.is_empty() {
            s.push_str(&format!("search {}\n", n.search.join(" ")));
        }
        for ns in &n.nameservers {
            s.push_str(&format!("nameserver {ns}\n"));
        }
    }
    s
}

fn ifreq(name: &str) -> Result<libc::ifreq, Fatal> {
    // SAFETY: ifreq is plain data (a name and a union of integers and
    // sockaddrs), for which all zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(Fatal::msg(format!("{name:?} is not an interface name")));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (d, s) in data[2..6].iter_mut().zip(ip.octets()) {
        *d = s as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

fn ioctl<T>(sock: &OwnedFd, request: libc::Ioctl, arg: &mut T, what: &str) -> Result<(), Fatal> {
    // SAFETY: `request` is one of SIOCSIFADDR, SIOCSIFNETMASK,
    // SIOCGIFFLAGS, SIOCSIFFLAGS (which take an ifreq) or SIOCADDRT (an
    // rtentry), and `arg` is that type, alive and writable for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) };
    if r < 0 {
        Err(Fatal::new(what.to_owned(), std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn up(sock: &OwnedFd, name: &str) -> Result<(), Fatal> {
    let mut req = ifreq(name)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("reading {name}'s flags"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("bringing {name} up"),
    )
}

/// Brings `lo` up, and the assigned interface with its address and route.
pub fn configure(net: Option<&GuestNetwork>) -> Result<(), Fatal> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Fatal::new("opening a socket to configure the network", e))?;
    up(&sock, "lo")?;
    let Some(n) = net else {
        return Ok(());
    };
    let (ip, len) = parse_cidr(&n.address)
        .ok_or_else(|| Fatal::msg(format!("{:?} is not an IPv4 address/prefix", n.address)))?;
    let name = &n.interface;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(ip);
    ioctl(
        &sock,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("setting {name}'s address {ip}"),
    )?;
    req.ifr_ifru.ifru_netmask = sockaddr(netmask(len));
    ioctl(
        &sock,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("setting {name}'s netmask"),
    )?;
    up(&sock, name)?;
    let Some(gw) = &n.gateway else {
        return Ok(());
    };
    let gw: Ipv4Addr = gw
        .parse()
        .map_err(|_| Fatal::msg(format!("{gw:?} is not an IPv4 gateway")))?;
    // SAFETY: rtentry is plain data for which all zero bytes are valid.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gw);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(
        &sock,
        libc::SIOCADDRT,
        &mut route,
        &format!("adding the default route via {gw}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> GuestNetwork {
        GuestNetwork {
            interface: "eth0".into(),
            address: "10.1.0.5/24".into(),
            gateway: Some("10.1.0.1".into()),
            nameservers: vec!["10.1.0.1".into(), "1.1.1.1".into()],
            search: vec!["ns.svc".into()],
        }
    }

    #[test]
    fn addresses_and_masks_read_right() {
        assert_eq!(
            parse_cidr("10.1.0.5/24"),
            Some(("10.1.0.5".parse().unwrap(), 24))
        );
        assert_eq!(parse_cidr("10.1.0.5/33"), None);
        assert_eq!(parse_cidr("10.1.0.5"), None);
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn etc_files_name_the_vm() {
        assert_eq!(
            hosts("web-0", Some(&net())),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.1.0.5\tweb-0\n"
        );
        assert!(hosts("web-0", None).ends_with("127.0.1.1\tweb-0\n"));
        assert_eq!(
            resolv_conf(Some(&net())),
            "search ns.svc\nnameserver 10.1.0.1\nnameserver 1.1.1.1\n"
        );
        assert_eq!(resolv_conf(None), "");
    }

    #[test]
    fn an_interface_name_that_does_not_fit_is_refused() {
        assert!(ifreq("a-name-longer-than-15").is_err());
        assert!(ifreq("").is_err());
        assert!(ifreq("eth0").is_ok());
    }
}
