//! Jail identities: the unprivileged uid and gid a jailed VMM runs as
//! (`spec.isolation.jail: Enabled`).
//!
//! Ids come from [`JAIL_ID_BASE`] .. [`JAIL_ID_BASE`] + [`JAIL_ID_COUNT`]:
//! 1879048192 (`0x7000_0000`) to 1879113727. That is the start of the range
//! systemd's "Users, Groups, UIDs and GIDs on systemd Systems" lists as
//! unused: above the container ranges (524288–1879048191) and below 2^31
//! (ids from 2^31 trip signed-integer bugs), far from system users (< 1000),
//! regular users (1000–60000), `nobody` (65534) and the usual `/etc/subuid`
//! ranges (from 100000). No user database entry is made; nothing on the node
//! owns files with these ids but the VMs' `run/` directories.
//!
//! A VM's uid and gid are the same number, chosen when the VM is first
//! prepared and kept in its state directory (`jail.json`), so agent restarts
//! and VMM restarts keep them. The choice is the lowest id no other VM
//! directory on this node holds, made under a lock, so no two VMs with state
//! here share one; an id is free again once its VM's directory is removed.
//! This module owns the range, the choice and the file; giving `run/` to the
//! id is a host effect ([`crate::host::Disks::give_dir`]).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::host::HostError;
use crate::state::{self, VmDir};

/// First id given to jails.
pub const JAIL_ID_BASE: u32 = 0x7000_0000;
/// How many ids jails may use (and so how many jailed VMs one node holds).
pub const JAIL_ID_COUNT: u32 = 65_536;

// Above systemd's container ranges (which end at 1879048191), below 2^31.
const _: () =
    assert!(JAIL_ID_BASE > 1_879_048_191 && JAIL_ID_BASE as u64 + JAIL_ID_COUNT as u64 <= 1 << 31);

/// The uid and gid of one VM's jailed VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JailIds {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl JailIds {
    fn same(id: u32) -> Self {
        Self { uid: id, gid: id }
    }
}

/// The id a VM gets: its own (`own`) when it has one in `range` that no other
/// VM holds, else the lowest id in `range` not in `taken`; `None` when all
/// are taken.
pub fn choose(own: Option<u32>, taken: &BTreeSet<u32>, range: Range<u32>) -> Option<u32> {
    if let Some(id) = own.filter(|id| range.contains(id) && !taken.contains(id)) {
        return Some(id);
    }
    range.into_iter().find(|id| !taken.contains(id))
}

/// Reads a VM's `jail.json`; `None` when absent or unreadable.
pub fn read(dir: &VmDir) -> Option<JailIds> {
    let text = std::fs::read_to_string(dir.jail_ids()).ok()?;
    serde_json::from_str(&text).ok()
}

/// Hands out jail ids from the VM directories under one agent root.
#[derive(Debug)]
pub struct JailIdAllocator {
    range: Range<u32>,
    lock: Mutex<()>,
}

impl Default for JailIdAllocator {
    fn default() -> Self {
        Self::new(JAIL_ID_BASE..JAIL_ID_BASE + JAIL_ID_COUNT)
    }
}

impl JailIdAllocator {
    /// An allocator over `range` (tests use small ones).
    pub fn new(range: Range<u32>) -> Self {
        Self {
            range,
            lock: Mutex::new(()),
        }
    }

    /// The ids of the VM in `dir` (under `root`), choosing and persisting
    /// them when it has none yet, or when its own collide with another VM's
    /// (which keeps them if its directory sorts first).
    pub fn ensure(&self, root: &Path, dir: &VmDir) -> Result<JailIds, HostError> {
        let _held = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let vms = root.join("vms");
        let entries: Vec<std::path::PathBuf> = match std::fs::read_dir(&vms) {
            Ok(e) => e.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(HostError::io("listing", &vms, e)),
        };
        let others: Vec<(std::path::PathBuf, JailIds)> = entries
            .into_iter()
            .filter(|p| p != dir.path())
            .filter_map(|p| read(&VmDir::at(p.clone())).map(|ids| (p, ids)))
            .collect();
        // Two directories claiming one id (copied state): the first keeps it.
        let own = read(dir);
        let keep = own.filter(|o| {
            o.uid == o.gid
                && !others
                    .iter()
                    .any(|(p, ids)| ids.uid == o.uid && p.as_path() < dir.path())
        });
        let mut taken = BTreeSet::new();
        for (_, ids) in &others {
            taken.insert(ids.uid);
            taken.insert(ids.gid);
        }
        if let Some(k) = keep {
            taken.remove(&k.uid);
        }
        let keep = keep.map(|k| k.uid);
        let id = choose(keep, &taken, self.range.clone()).ok_or_else(|| HostError::Invalid {
            what: "jail ids",
            value: format!(
                "all {} ids from {} are taken by VMs on this node",
                self.range.len(),
                self.range.start
            ),
        })?;
        let ids = JailIds::same(id);
        if own != Some(ids) {
            let text = serde_json::to_vec_pretty(&ids).unwrap_or_default();
            state::write_atomic(&dir.jail_ids(), &text)?;
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_keeps_an_own_id_else_takes_the_lowest_free() {
        let taken: BTreeSet<u32> = [10, 11, 13].into();
        assert_eq!(choose(None, &taken, 10..20), Some(12));
        assert_eq!(choose(Some(17), &taken, 10..20), Some(17));
        // An own id another VM holds, or outside the range, is replaced.
        assert_eq!(choose(Some(13), &taken, 10..20), Some(12));
        assert_eq!(choose(Some(3), &taken, 10..20), Some(12));
        assert_eq!(choose(None, &taken, 10..12), None);
    }

    fn vm(root: &Path, name: &str) -> VmDir {
        let d = VmDir::new(root, "ns", name);
        d.create().unwrap();
        d
    }

    #[test]
    fn ids_are_persisted_stable_and_never_shared() {
        let root = tempfile::tempdir().unwrap();
        let alloc = JailIdAllocator::new(100..103);
        let (a, b, c) = (
            vm(root.path(), "a"),
            vm(root.path(), "b"),
            vm(root.path(), "c"),
        );
        let ia = alloc.ensure(root.path(), &a).unwrap();
        let ib = alloc.ensure(root.path(), &b).unwrap();
        assert_eq!((ia, ib), (JailIds::same(100), JailIds::same(101)));
        assert_eq!(read(&a), Some(ia));
        // Stable: again, and from a new allocator (an agent restart).
        assert_eq!(alloc.ensure(root.path(), &b).unwrap(), ib);
        let restarted = JailIdAllocator::new(100..103);
        assert_eq!(restarted.ensure(root.path(), &a).unwrap(), ia);
        assert_eq!(
            restarted.ensure(root.path(), &c).unwrap(),
            JailIds::same(102)
        );
        // Full: a fourth VM gets a clear error and no file.
        let d = vm(root.path(), "d");
        let e = restarted.ensure(root.path(), &d).unwrap_err();
        assert!(e.to_string().contains("all 3 ids from 100"), "{e}");
        assert!(read(&d).is_none());
        // A removed VM frees its id for the next one.
        b.remove().unwrap();
        assert_eq!(restarted.ensure(root.path(), &d).unwrap(), ib);
        // A copied jail.json: the directory sorting first keeps the id.
        std::fs::copy(a.jail_ids(), c.jail_ids()).unwrap();
        assert_eq!(restarted.ensure(root.path(), &a).unwrap(), ia);
        let moved = restarted.ensure(root.path(), &c).unwrap();
        assert_ne!(moved, ia);
        assert_eq!(read(&c), Some(moved));
    }

    #[test]
    fn concurrent_vms_get_distinct_ids() {
        let root = tempfile::tempdir().unwrap();
        let alloc = std::sync::Arc::new(JailIdAllocator::new(500..600));
        let dirs: Vec<VmDir> = (0..16).map(|i| vm(root.path(), &format!("v{i}"))).collect();
        let threads: Vec<_> = dirs
            .into_iter()
            .map(|d| {
                let (alloc, root) = (alloc.clone(), root.path().to_owned());
                std::thread::spawn(move || alloc.ensure(&root, &d).unwrap().uid)
            })
            .collect();
        let ids: BTreeSet<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(ids.len(), 16);
    }
}
