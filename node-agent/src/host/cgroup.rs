//! cgroups for VMM processes: one cgroup per VM under a parent (`/runv` by
//! default), carrying the VM's `spec.isolation.limits` as CPU bandwidth and a
//! memory limit for the whole VMM process, guest memory included.
//!
//! Both cgroup versions, detected once when the agent starts:
//!
//! - **v2** (unified hierarchy mounted at the cgroup root, `cgroup.controllers`
//!   there lists `cpu` and `memory`): `<root>/<parent>/<vm>/` with `cpu.max` and
//!   `memory.max`; `+cpu +memory` is written into `cgroup.subtree_control` of
//!   every ancestor from the root down to the parent that lacks them.
//! - **v1** (a tmpfs at the cgroup root with `cpu` and `memory` hierarchies):
//!   `<root>/cpu/<parent>/<vm>/` with `cpu.cfs_period_us` and `cpu.cfs_quota_us`,
//!   `<root>/memory/<parent>/<vm>/` with `memory.limit_in_bytes`.
//!
//! The kernel's OOM killer counts its kills per cgroup (`oom_kill` in v2's
//! `memory.events`, and in v1's `memory.oom_control` from Linux 4.13): that
//! counter tells an OOM-killed VMM from one killed otherwise.
//!
//! A VM is ended by its cgroup, not only by its VMM's pid, so that nothing
//! the VMM may have started outlives it: v2's `cgroup.kill` (Linux 5.14)
//! kills every member at once, forks racing with it included; elsewhere each
//! pid in `cgroup.procs` gets SIGKILL through a pidfd (so a pid reused
//! meanwhile is never hit), round after round until the cgroup is empty.
//!
//! An absolute parent (`/runv`) is taken from each hierarchy's root; a relative
//! one (`runv-test`) from the agent's own cgroup in that hierarchy
//! (`/proc/self/cgroup`). The VMM joins its cgroup itself, in the forked child
//! before `exec` ([`super::process`]): this module creates, limits and removes
//! cgroups and never moves a process. It must not decide which VM gets which
//! limits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Cgroups, HostError};

/// The CFS period the agent uses: 100 ms, as kubelet and runc do.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The smallest quota the kernel accepts (1 ms per period).
pub const MIN_CPU_QUOTA_US: u64 = 1_000;

/// Limits of one VM's cgroup, in the kernel's units. Callers convert what a
/// spec asks for into these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// CPU time the VMM may use per [`CPU_PERIOD_US`], in µs (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_us: Option<u64>,
    /// Memory limit in bytes, a multiple of 4 KiB (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.cpu_quota_us.is_some() || self.memory_bytes.is_some()
    }
}

/// How many times [`Cgroups::kill_all`] kills and looks again, [`KILL_PAUSE`]
/// apart, before it gives up on a cgroup that does not empty (about 1 s).
const KILL_ROUNDS: u32 = 200;

/// The pause between two rounds of [`Cgroups::kill_all`].
const KILL_PAUSE: Duration = Duration::from_millis(5);

/// Where the agent's cgroups go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupConfig {
    /// Where the cgroup filesystems are mounted.
    pub mount: PathBuf,
    /// The parent of the VMs' cgroups: absolute from each hierarchy's root
    /// (`/runv`), or relative to the agent's own cgroup (`runv-test`).
    pub parent: String,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            mount: PathBuf::from("/sys/fs/cgroup"),
            parent: "/runv".into(),
        }
    }
}

/// The parent directories of the VMs' cgroups, per cgroup version.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Layout {
    /// cgroup v2: the unified root (for `subtree_control`) and the parent.
    V2 { root: PathBuf, parent: PathBuf },
    /// cgroup v1: the parent in the `cpu` and in the `memory` hierarchy.
    V1 { cpu: PathBuf, memory: PathBuf },
}

/// cgroups through the cgroup filesystem.
#[derive(Clone, Debug)]
pub struct LinuxCgroups {
    /// The detected layout, or why cgroups cannot be used here.
    layout: Result<Layout, String>,
}

impl Default for LinuxCgroups {
    fn default() -> Self {
        Self::detect(&CgroupConfig::default())
    }
}

/// A cgroup I/O error.
fn cg_err(what: &'static str, path: &Path, source: std::io::Error) -> HostError {
    HostError::Cgroup {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The agent's own cgroup path in the hierarchy `controller` (`""`: the v2
/// line), from `/proc/self/cgroup` text.
pub fn own_cgroup(proc_self_cgroup: &str, controller: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_owned())
    })
}

/// Checks a cgroup parent or name: no `.`/`..` components, nothing empty but
/// a leading or trailing slash.
fn check_path(what: &'static str, p: &str) -> Result<(), String> {
    let inner = p.trim_start_matches('/').trim_end_matches('/');
    let ok = !inner.is_empty()
        && inner
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\n'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid cgroup {what} {p:?}"))
    }
}

/// Checks a VM's cgroup name: one path component.
fn check_name(name: &str) -> Result<(), HostError> {
    if check_path("name", name).is_ok() && !name.contains('/') {
        Ok(())
    } else {
        Err(HostError::Invalid {
            what: "cgroup name",
            value: name.to_owned(),
        })
    }
}

/// `base` joined with `own` (for a relative parent) and `parent`.
fn parent_dir(base: &Path, own: Option<&str>, parent: &str) -> PathBuf {
    let mut dir = base.to_owned();
    if !parent.starts_with('/')
        && let Some(own) = own
    {
        dir.extend(own.split('/').filter(|c| !c.is_empty()));
    }
    dir.extend(parent.split('/').filter(|c| !c.is_empty()));
    dir
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

impl LinuxCgroups {
    /// Finds which cgroup version `config.mount` holds and where the parent is.
    pub fn detect(config: &CgroupConfig) -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self {
            layout: Self::layout(config, &own),
        }
    }

    fn layout(config: &CgroupConfig, own: &str) -> Result<Layout, String> {
        check_path("parent", &config.parent)?;
        let m = &config.mount;
        if let Some(ctl) = read_trimmed(&m.join("cgroup.controllers")) {
            let have: Vec<&str> = ctl.split_whitespace().collect();
            let missing: Vec<&str> = ["cpu", "memory"]
                .into_iter()
                .filter(|c| !have.contains(c))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "cgroup v2 at {} lacks the controllers {}",
                    m.display(),
                    missing.join(", ")
                ));
            }
            return Ok(Layout::V2 {
                root: m.clone(),
                parent: parent_dir(m, own_cgroup(own, "").as_deref(), &config.parent),
            });
        }
        let cpu = m.join("cpu");
        let memory = m.join("memory");
        if cpu.join("cpu.cfs_quota_us").is_file() && memory.join("memory.limit_in_bytes").is_file()
        {
            return Ok(Layout::V1 {
                cpu: parent_dir(&cpu, own_cgroup(own, "cpu").as_deref(), &config.parent),
                memory: parent_dir(
                    &memory,
                    own_cgroup(own, "memory").as_deref(),
                    &config.parent,
                ),
            });
        }
        Err(format!(
            "no cgroup v2 with the cpu and memory controllers at {}, and no cgroup v1 cpu and memory hierarchies under it",
            m.display()
        ))
    }

    /// One line for logs: the version and the parent directories, or why none.
    pub fn describe(&self) -> String {
        match &self.layout {
            Ok(Layout::V2 { parent, .. }) => format!("cgroup v2, VMs under {}", parent.display()),
            Ok(Layout::V1 { cpu, memory }) => format!(
                "cgroup v1, VMs under {} and {}",
                cpu.display(),
                memory.display()
            ),
            Err(why) => format!("no usable cgroups: {why}"),
        }
    }

    /// The VM's cgroup directories, one per hierarchy.
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match &self.layout {
            Ok(Layout::V2 { parent, .. }) => vec![parent.join(name)],
            Ok(Layout::V1 { cpu, memory }) => vec![cpu.join(name), memory.join(name)],
            Err(_) => Vec::new(),
        }
    }

    /// Writes `+cpu +memory` to `cgroup.subtree_control` from the root down to
    /// the parent, where they are not enabled yet.
    fn enable_controllers(root: &Path, parent: &Path) -> Result<(), HostError> {
        let mut dirs: Vec<&Path> = parent
            .ancestors()
            .take_while(|d| d.starts_with(root))
            .collect();
        dirs.reverse();
        for dir in dirs {
            let file = dir.join("cgroup.subtree_control");
            let now = read_trimmed(&file).unwrap_or_default();
            let missing: Vec<String> = ["cpu", "memory"]
                .into_iter()
                .filter(|c| !now.split_whitespace().any(|x| x == *c))
                .map(|c| format!("+{c}"))
                .collect();
            if !missing.is_empty() {
                std::fs::write(&file, missing.join(" "))
                    .map_err(|e| cg_err("enabling controllers in", &file, e))?;
            }
        }
        Ok(())
    }

    /// Writes `value` to `dir/file` unless it already reads `current`.
    fn set(
        dir: &Path,
        file: &str,
        value: &str,
        current: impl Fn(&str) -> bool,
    ) -> Result<(), HostError> {
        let path = dir.join(file);
        if read_trimmed(&path).is_some_and(|now| current(&now)) {
            return Ok(());
        }
        std::fs::write(&path, value).map_err(|e| cg_err("writing", &path, e))
    }

    fn mkdir(dir: &Path) -> Result<(), HostError> {
        std::fs::create_dir_all(dir).map_err(|e| cg_err("creating", dir, e))
    }

    /// The pids in `cgroup.procs` of each of `dirs` (one per hierarchy), merged.
    fn members(dirs: &[PathBuf]) -> BTreeSet<u32> {
        dirs.iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// SIGKILL to `pid` if it is a member of `dirs`. A pidfd names one
    /// process, never a later one with the same pid: opened first, then
    /// membership checked again, it reaches the member or nothing. Where the
    /// kernel gives no pidfd (before 5.3), kill(2) right after the check.
    fn kill_member(pid: u32, dirs: &[PathBuf]) -> Result<(), HostError> {
        use rustix::io::Errno;
        use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
        let Some(raw) = i32::try_from(pid).ok().filter(|p| *p > 0) else {
            return Ok(());
        };
        let Some(id) = Pid::from_raw(raw) else {
            return Ok(());
        };
        let fd = match pidfd_open(id, PidfdFlags::empty()) {
            Ok(fd) => Some(fd),
            Err(Errno::SRCH) => return Ok(()),
            // No pidfds (ENOSYS before 5.3), or none for this process.
            Err(_) => None,
        };
        if !Self::members(dirs).contains(&pid) {
            return Ok(());
        }
        let sent: std::io::Result<()> = match fd {
            Some(fd) => pidfd_send_signal(&fd, Signal::KILL).map_err(Into::into),
            // SAFETY: kill(2) has no memory-safety preconditions; `raw` was
            // a member of the cgroup just above.
            None => match unsafe { libc::kill(raw, libc::SIGKILL) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            },
        };
        match sent {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                Err(cg_err("killing a process of", &dirs[0], e))
            }
            _ => Ok(()),
        }
    }
}

/// The `oom_kill` count in the text of v2's `memory.events` or v1's
/// `memory.oom_control` (lines of `key value`).
pub fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

/// v1 reads an unlimited value as a huge number (`-1` written).
fn v1_unlimited(now: &str) -> bool {
    now == "-1" || now.parse::<u64>().is_ok_and(|v| v >= 1 << 62)
}

impl Cgroups for LinuxCgroups {
    fn available(&self) -> Result<(), HostError> {
        self.layout
            .as_ref()
            .map(drop)
            .map_err(|why| HostError::CgroupsUnavailable(why.clone()))
    }

    fn ensure(&self, name: &str, limits: &Limits) -> Result<Vec<PathBuf>, HostError> {
        check_name(name)?;
        let layout = self
            .layout
            .as_ref()
            .map_err(|why| HostError::CgroupsUnavailable(why.clone()))?;
        match layout {
            Layout::V2 { root, parent } => {
                Self::mkdir(parent)?;
                Self::enable_controllers(root, parent)?;
                let dir = parent.join(name);
                Self::mkdir(&dir)?;
                let cpu = match limits.cpu_quota_us {
                    Some(q) => format!("{q} {CPU_PERIOD_US}"),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                Self::set(&dir, "cpu.max", &cpu, |now| now == cpu)?;
                let mem = limits
                    .memory_bytes
                    .map_or_else(|| "max".to_owned(), |b| b.to_string());
                Self::set(&dir, "memory.max", &mem, |now| now == mem)?;
                Ok(vec![dir.join("cgroup.procs")])
            }
            Layout::V1 { cpu, memory } => {
                let cpu_dir = cpu.join(name);
                let mem_dir = memory.join(name);
                Self::mkdir(&cpu_dir)?;
                Self::mkdir(&mem_dir)?;
                let period = CPU_PERIOD_US.to_string();
                Self::set(&cpu_dir, "cpu.cfs_period_us", &period, |now| now == period)?;
                match limits.cpu_quota_us {
                    Some(q) => {
                        let q = q.to_string();
                        Self::set(&cpu_dir, "cpu.cfs_quota_us", &q, |now| now == q)?;
                    }
                    None => Self::set(&cpu_dir, "cpu.cfs_quota_us", "-1", |now| now == "-1")?,
                }
                match limits.memory_bytes {
                    Some(b) => {
                        let b = b.to_string();
                        Self::set(&mem_dir, "memory.limit_in_bytes", &b, |now| now == b)?;
                    }
                    None => Self::set(&mem_dir, "memory.limit_in_bytes", "-1", v1_unlimited)?,
                }
                Ok(vec![
                    cpu_dir.join("cgroup.procs"),
                    mem_dir.join("cgroup.procs"),
                ])
            }
        }
    }

    fn current(&self, name: &str) -> Option<Limits> {
        let layout = self.layout.as_ref().ok()?;
        match layout {
            Layout::V2 { parent, .. } => {
                let dir = parent.join(name);
                let cpu = read_trimmed(&dir.join("cpu.max"))?;
                let mem = read_trimmed(&dir.join("memory.max"))?;
                Some(Limits {
                    cpu_quota_us: cpu.split_whitespace().next()?.parse().ok(),
                    memory_bytes: mem.parse().ok(),
                })
            }
            Layout::V1 { cpu, memory } => {
                let quota = read_trimmed(&cpu.join(name).join("cpu.cfs_quota_us"))?;
                let mem = read_trimmed(&memory.join(name).join("memory.limit_in_bytes"))?;
                Some(Limits {
                    cpu_quota_us: quota.parse().ok(),
                    memory_bytes: (!v1_unlimited(&mem)).then(|| mem.parse().ok()).flatten(),
                })
            }
        }
    }

    fn procs(&self, name: &str) -> Vec<u32> {
        self.dirs(name)
            .first()
            .and_then(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    fn oom_kills(&self, name: &str) -> Option<u64> {
        check_name(name).ok()?;
        let file = match self.layout.as_ref().ok()? {
            Layout::V2 { parent, .. } => parent.join(name).join("memory.events"),
            Layout::V1 { memory, .. } => memory.join(name).join("memory.oom_control"),
        };
        parse_oom_kill(&std::fs::read_to_string(file).ok()?)
    }

    fn kill_all(&self, name: &str) -> Result<(), HostError> {
        check_name(name)?;
        let dirs: Vec<PathBuf> = self.dirs(name).into_iter().filter(|d| d.is_dir()).collect();
        let Some(first) = dirs.first() else {
            return Ok(());
        };
        let kill_file = first.join("cgroup.kill");
        let by_file = matches!(self.layout, Ok(Layout::V2 { .. })) && kill_file.is_file();
        for _ in 0..KILL_ROUNDS {
            let members = Self::members(&dirs);
            if members.is_empty() {
                return Ok(());
            }
            if by_file {
                std::fs::write(&kill_file, "1")
                    .map_err(|e| cg_err("killing the processes of", first, e))?;
            } else {
                for pid in members {
                    Self::kill_member(pid, &dirs)?;
                }
            }
            std::thread::sleep(KILL_PAUSE);
        }
        Err(cg_err(
            "emptying",
            first,
            std::io::ErrorKind::TimedOut.into(),
        ))
    }

    fn remove(&self, name: &str) -> Result<(), HostError> {
        check_name(name)?;
        for dir in self.dirs(name) {
            // A VMM that was just killed leaves its cgroup a moment later.
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(cg_err("removing", &dir, e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_SELF_V1: &str =
        "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n2:cpuacct:/\n0::/\n";

    #[test]
    fn own_cgroup_per_hierarchy() {
        assert_eq!(
            own_cgroup(PROC_SELF_V1, "memory").as_deref(),
            Some("/process_api/abc")
        );
        assert_eq!(own_cgroup(PROC_SELF_V1, "cpu").as_deref(), Some("/"));
        assert_eq!(own_cgroup(PROC_SELF_V1, "").as_deref(), Some("/"));
        assert_eq!(
            own_cgroup("3:cpu,cpuacct:/a/b\n", "cpu").as_deref(),
            Some("/a/b")
        );
        assert_eq!(
            own_cgroup("0::/system.slice/x.service\n", "").as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(own_cgroup("", "cpu"), None);
    }

    /// A directory that looks like a v1 cgroup mount (regular files stand in
    /// for the kernel's control files).
    fn fake_v1(root: &Path) {
        for (h, f) in [
            ("cpu", "cpu.cfs_quota_us"),
            ("memory", "memory.limit_in_bytes"),
        ] {
            std::fs::create_dir_all(root.join(h)).unwrap();
            std::fs::write(root.join(h).join(f), "-1").unwrap();
        }
    }

    #[test]
    fn detects_v1_and_writes_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        fake_v1(tmp.path());
        let config = CgroupConfig {
            mount: tmp.path().to_owned(),
            parent: "/runv".into(),
        };
        let cg = LinuxCgroups {
            layout: LinuxCgroups::layout(&config, PROC_SELF_V1),
        };
        assert!(cg.available().is_ok());
        assert!(cg.describe().starts_with("cgroup v1"), "{}", cg.describe());
        let want = Limits {
            cpu_quota_us: Some(25_000),
            memory_bytes: Some(96 << 20),
        };
        let procs = cg.ensure("default_web", &want).unwrap();
        assert_eq!(
            procs,
            vec![
                tmp.path().join("cpu/runv/default_web/cgroup.procs"),
                tmp.path().join("memory/runv/default_web/cgroup.procs"),
            ]
        );
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(read("cpu/runv/default_web/cpu.cfs_quota_us"), "25000");
        assert_eq!(read("cpu/runv/default_web/cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("memory/runv/default_web/memory.limit_in_bytes"),
            (96u64 << 20).to_string()
        );
        assert_eq!(cg.current("default_web"), Some(want));
        // The OOM killer's count, where the kernel has it (4.13 and later).
        assert_eq!(cg.oom_kills("default_web"), None);
        std::fs::write(
            tmp.path()
                .join("memory/runv/default_web/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills("default_web"), Some(2));
        assert_eq!(cg.oom_kills("missing"), None);
        // Unlimited again.
        cg.ensure("default_web", &Limits::default()).unwrap();
        assert_eq!(cg.current("default_web"), Some(Limits::default()));

        // A relative parent nests under the agent's own cgroup per hierarchy.
        let nested = LinuxCgroups {
            layout: LinuxCgroups::layout(
                &CgroupConfig {
                    mount: tmp.path().to_owned(),
                    parent: "runv-test".into(),
                },
                PROC_SELF_V1,
            ),
        };
        let procs = nested.ensure("default_web", &want).unwrap();
        assert_eq!(
            procs[1],
            tmp.path()
                .join("memory/process_api/abc/runv-test/default_web/cgroup.procs")
        );
        assert_eq!(
            procs[0],
            tmp.path().join("cpu/runv-test/default_web/cgroup.procs")
        );
    }

    #[test]
    fn detects_v2_enables_controllers_and_writes_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "cpu\n").unwrap();
        let cg = LinuxCgroups {
            layout: LinuxCgroups::layout(
                &CgroupConfig {
                    mount: root.to_owned(),
                    parent: "/runv".into(),
                },
                "0::/\n",
            ),
        };
        assert!(cg.describe().starts_with("cgroup v2"), "{}", cg.describe());
        let want = Limits {
            cpu_quota_us: Some(50_000),
            memory_bytes: None,
        };
        let procs = cg.ensure("default_web", &want).unwrap();
        assert_eq!(procs, vec![root.join("runv/default_web/cgroup.procs")]);
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        // Only what was missing is enabled (on a real cgroupfs the file then
        // lists both).
        assert_eq!(read("cgroup.subtree_control"), "+memory");
        assert_eq!(read("runv/cgroup.subtree_control"), "+cpu +memory");
        assert_eq!(read("runv/default_web/cpu.max"), "50000 100000");
        assert_eq!(read("runv/default_web/memory.max"), "max");
        assert_eq!(cg.current("default_web"), Some(want));
        std::fs::write(
            root.join("runv/default_web/memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills("default_web"), Some(1));
    }

    #[test]
    fn oom_kill_counter_lines() {
        assert_eq!(parse_oom_kill("oom 3\noom_kill 2\n"), Some(2));
        assert_eq!(parse_oom_kill("oom_kill_disable 0\nunder_oom 0\n"), None);
        assert_eq!(parse_oom_kill("oom_kill x\n"), None);
        assert_eq!(parse_oom_kill(""), None);
    }

    #[test]
    fn v2_without_controllers_and_no_cgroups_are_unavailable_with_a_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let config = CgroupConfig {
            mount: tmp.path().to_owned(),
            parent: "/runv".into(),
        };
        let e = LinuxCgroups::layout(&config, "").unwrap_err();
        assert!(e.contains("no cgroup v2"), "{e}");
        std::fs::write(tmp.path().join("cgroup.controllers"), "pids\n").unwrap();
        let cg = LinuxCgroups {
            layout: LinuxCgroups::layout(&config, ""),
        };
        let e = cg.ensure("x", &Limits::default()).unwrap_err();
        assert!(matches!(e, HostError::CgroupsUnavailable(_)));
        assert!(
            e.to_string().contains("lacks the controllers cpu, memory"),
            "{e}"
        );
        assert!(cg.remove("x").is_ok(), "nothing to remove");
        let bad = CgroupConfig {
            mount: tmp.path().to_owned(),
            parent: "/runv/../etc".into(),
        };
        assert!(LinuxCgroups::layout(&bad, "").is_err());
    }

    /// A `sleep` moved into the cgroups whose `cgroup.procs` are `procs`;
    /// killed when dropped if it still runs.
    struct Member(std::process::Child);

    impl Member {
        fn join(procs: &[PathBuf]) -> Self {
            let m = Self(
                std::process::Command::new("sleep")
                    .arg("600")
                    .spawn()
                    .unwrap(),
            );
            for p in procs {
                std::fs::write(p, m.0.id().to_string()).unwrap();
            }
            m
        }

        /// The signal that ended it, once it has ended (it must have).
        fn ended_by(&mut self) -> Option<i32> {
            use std::os::unix::process::ExitStatusExt;
            let start = std::time::Instant::now();
            loop {
                if let Some(status) = self.0.try_wait().unwrap() {
                    return status.signal();
                }
                assert!(start.elapsed() < Duration::from_secs(10), "still runs");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for Member {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Removes the test's cgroup directories, innermost first, even on failure.
    struct Dirs(Vec<PathBuf>);

    impl Drop for Dirs {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::fs::remove_dir(d);
            }
        }
    }

    #[test]
    fn kill_all_ends_every_member_with_this_machines_cgroups() {
        if !crate::host::testing::require(
            "kill_all_ends_every_member_with_this_machines_cgroups",
            &[crate::host::testing::Need::Root],
        ) {
            return;
        }
        let parent = format!("runv-kill-{}", std::process::id());
        let cg = LinuxCgroups::detect(&CgroupConfig {
            parent,
            ..CgroupConfig::default()
        });
        if cg.available().is_err() {
            eprintln!("skipping: {}", cg.describe());
            return;
        }
        let procs = cg.ensure("vm", &Limits::default()).unwrap();
        let mut dirs: Vec<PathBuf> = procs.iter().map(|p| p.parent().unwrap().into()).collect();
        dirs.extend(
            procs
                .iter()
                .map(|p| p.parent().unwrap().parent().unwrap().into()),
        );
        let _dirs = Dirs(dirs);
        let mut a = Member::join(&procs);
        let mut b = Member::join(&procs);
        assert_eq!(cg.procs("vm").len(), 2);
        cg.kill_all("vm").unwrap();
        assert_eq!(a.ended_by(), Some(libc::SIGKILL));
        assert_eq!(b.ended_by(), Some(libc::SIGKILL));
        assert!(cg.procs("vm").is_empty());
        cg.remove("vm").unwrap();
        // Gone, or never there: nothing to do.
        cg.kill_all("vm").unwrap();
        eprintln!("kill_all: {}", cg.describe());
    }

    /// The cgroup v2 mount point, if one is mounted.
    fn cgroup2_mount() -> Option<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        info.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
    }

    #[test]
    fn kill_all_ends_every_member_on_v2_with_cgroup_kill() {
        if !crate::host::testing::require(
            "kill_all_ends_every_member_on_v2_with_cgroup_kill",
            &[crate::host::testing::Need::Root],
        ) {
            return;
        }
        let Some(mount) = cgroup2_mount() else {
            eprintln!(
                "kill_all_ends_every_member_on_v2_with_cgroup_kill: skipping: no cgroup2 mount"
            );
            return;
        };
        // The v2 layout over whatever cgroup2 is mounted (the unified tree of a
        // hybrid host too, whose controllers are v1's: no limits are set here).
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let parent = parent_dir(
            &mount,
            own_cgroup(&own, "").as_deref(),
            &format!("runv-kill-v2-{}", std::process::id()),
        );
        let dir = parent.join("vm");
        let _dirs = Dirs(vec![dir.clone(), parent.clone()]);
        std::fs::create_dir_all(&dir).unwrap();
        if !dir.join("cgroup.kill").is_file() {
            eprintln!(
                "kill_all_ends_every_member_on_v2_with_cgroup_kill: skipping: no cgroup.kill (Linux before 5.14)"
            );
            return;
        }
        let cg = LinuxCgroups {
            layout: Ok(Layout::V2 {
                root: mount,
                parent,
            }),
        };
        let mut a = Member::join(&[dir.join("cgroup.procs")]);
        assert_eq!(cg.procs("vm"), [a.0.id()]);
        cg.kill_all("vm").unwrap();
        assert_eq!(a.ended_by(), Some(libc::SIGKILL));
        assert!(cg.procs("vm").is_empty());
        cg.remove("vm").unwrap();
    }
}
