//! Node-local IPAM: one IPv4 subnet per node, one address per VM interface,
//! persisted as JSON in the agent's state directory so a restarted agent hands
//! out the same addresses and never a taken one.
//!
//! The allocation rule is pure ([`Pool`]); [`FileIpam`] adds the file, written
//! to a temporary name and renamed so a crash leaves the old or the new state,
//! never half of one. It owns addresses only, not devices.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::HostError;

/// A subnet and who holds which address in it. The network address, the
/// gateway (first host) and the broadcast address are never handed out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pool {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length, 16 to 30.
    pub prefix: u8,
    /// Address → owner key (`namespace/name/interface`).
    pub leases: BTreeMap<Ipv4Addr, String>,
}

impl Pool {
    /// An empty pool; `network` is masked to `prefix`.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, HostError> {
        if !(16..=30).contains(&prefix) {
            return Err(HostError::Invalid {
                what: "subnet prefix length (16 to 30)",
                value: prefix.to_string(),
            });
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(network) & mask),
            prefix,
            leases: BTreeMap::new(),
        })
    }

    /// The gateway: the first host address, held by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    fn last_host(&self) -> u32 {
        u32::from(self.network) + (1u32 << (32 - self.prefix)) - 2
    }

    /// The address of `owner`, allocating the lowest free one if it has none.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, HostError> {
        if let Some(ip) = self.lookup(owner) {
            return Ok(ip);
        }
        let first = u32::from(self.gateway()) + 1;
        let ip = (first..=self.last_host())
            .map(Ipv4Addr::from)
            .find(|ip| !self.leases.contains_key(ip))
            .ok_or_else(|| HostError::PoolExhausted(format!("{}/{}", self.network, self.prefix)))?;
        self.leases.insert(ip, owner.to_owned());
        Ok(ip)
    }

    /// The address `owner` holds.
    pub fn lookup(&self, owner: &str) -> Option<Ipv4Addr> {
        self.leases
            .iter()
            .find(|(_, o)| o.as_str() == owner)
            .map(|(ip, _)| *ip)
    }

    /// Releases every address whose owner key starts with `prefix`; returns them.
    pub fn release_prefix(&mut self, prefix: &str) -> Vec<Ipv4Addr> {
        let gone: Vec<Ipv4Addr> = self
            .leases
            .iter()
            .filter(|(_, o)| o.starts_with(prefix))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &gone {
            self.leases.remove(ip);
        }
        gone
    }
}

/// A [`Pool`] kept in a file.
#[derive(Debug)]
pub struct FileIpam {
    path: PathBuf,
    pool: Mutex<Pool>,
}

impl FileIpam {
    /// Opens the pool file, or starts an empty pool for `network/prefix` when it
    /// does not exist. A file for another subnet is an error: changing the
    /// subnet under running VMs would hand out taken addresses.
    pub fn open(path: &Path, network: Ipv4Addr, prefix: u8) -> Result<Self, HostError> {
        let fresh = Pool::new(network, prefix)?;
        let pool = match std::fs::read_to_string(path) {
            Ok(text) => {
                let pool: Pool =
                    serde_json::from_str(&text).map_err(|source| HostError::Parse {
                        path: path.to_owned(),
                        source,
                    })?;
                if (pool.network, pool.prefix) != (fresh.network, fresh.prefix) {
                    return Err(HostError::Invalid {
                        what: "subnet (the IPAM state file holds another one)",
                        value: format!(
                            "{}/{} vs {}/{}",
                            fresh.network, prefix, pool.network, pool.prefix
                        ),
                    });
                }
                pool
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh,
            Err(e) => return Err(HostError::io("reading", path, e)),
        };
        Ok(Self {
            path: path.to_owned(),
            pool: Mutex::new(pool),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, pool: &Pool) -> Result<(), HostError> {
        let text = serde_json::to_string_pretty(pool).unwrap_or_default();
        super::files::write_atomic(&self.path, text.as_bytes())
    }

    /// The gateway address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.lock().gateway()
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.lock().prefix
    }

    /// Allocates (or returns) the address of `owner`, persisted before it is returned.
    pub fn allocate(&self, owner: &str) -> Result<Ipv4Addr, HostError> {
        let mut pool = self.lock();
        let before = pool.clone();
        let ip = pool.allocate(owner)?;
        if *pool != before
            && let Err(e) = self.save(&pool)
        {
            *pool = before;
            return Err(e);
        }
        Ok(ip)
    }

    /// Releases every address of owners starting with `prefix`, persisted.
    pub fn release_prefix(&self, prefix: &str) -> Result<Vec<Ipv4Addr>, HostError> {
        let mut pool = self.lock();
        let gone = pool.release_prefix(prefix);
        if !gone.is_empty() {
            self.save(&pool)?;
        }
        Ok(gone)
    }

    /// The address `owner` holds.
    pub fn lookup(&self, owner: &str) -> Option<Ipv4Addr> {
        self.lock().lookup(owner)
    }

    /// How many addresses are held.
    pub fn len(&self) -> usize {
        self.lock().leases.len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_and_skips_reserved() {
        let mut p = Pool::new(Ipv4Addr::new(10, 213, 0, 77), 29).unwrap();
        assert_eq!(p.network, Ipv4Addr::new(10, 213, 0, 72));
        assert_eq!(p.gateway(), Ipv4Addr::new(10, 213, 0, 73));
        let a = p.allocate("ns/a/eth0").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 213, 0, 74));
        assert_eq!(p.allocate("ns/a/eth0").unwrap(), a, "stable per owner");
        let ips: Vec<_> = ["b", "c", "d", "e"]
            .iter()
            .map(|n| p.allocate(&format!("ns/{n}/eth0")).unwrap())
            .collect();
        assert_eq!(ips.last(), Some(&Ipv4Addr::new(10, 213, 0, 78)));
        // .79 is the broadcast address.
        assert!(matches!(
            p.allocate("ns/f/eth0"),
            Err(HostError::PoolExhausted(_))
        ));
        assert_eq!(
            p.release_prefix("ns/b/"),
            vec![Ipv4Addr::new(10, 213, 0, 75)]
        );
        assert_eq!(
            p.allocate("ns/f/eth0").unwrap(),
            Ipv4Addr::new(10, 213, 0, 75)
        );
        assert!(Pool::new(Ipv4Addr::new(10, 0, 0, 0), 31).is_err());
    }

    #[test]
    fn release_prefix_does_not_touch_similar_names() {
        let mut p = Pool::new(Ipv4Addr::new(10, 0, 0, 0), 24).unwrap();
        p.allocate("ns/web/eth0").unwrap();
        p.allocate("ns/web-2/eth0").unwrap();
        assert_eq!(p.release_prefix("ns/web/").len(), 1);
        assert!(p.lookup("ns/web-2/eth0").is_some());
    }

    #[test]
    fn survives_a_restart_and_refuses_another_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let net = Ipv4Addr::new(10, 213, 0, 0);
        let ipam = FileIpam::open(&path, net, 24).unwrap();
        let a = ipam.allocate("ns/a/eth0").unwrap();
        let b = ipam.allocate("ns/b/eth0").unwrap();
        ipam.release_prefix("ns/a/").unwrap();
        drop(ipam);
        let again = FileIpam::open(&path, net, 24).unwrap();
        assert_eq!(again.lookup("ns/b/eth0"), Some(b));
        assert_eq!(again.lookup("ns/a/eth0"), None);
        assert_eq!(
            again.allocate("ns/c/eth0").unwrap(),
            a,
            "the freed address is reused"
        );
        assert_eq!(again.len(), 2);
        assert!(FileIpam::open(&path, Ipv4Addr::new(10, 9, 0, 0), 24).is_err());
        std::fs::write(&path, "{broken").unwrap();
        assert!(FileIpam::open(&path, net, 24).is_err());
    }
}
