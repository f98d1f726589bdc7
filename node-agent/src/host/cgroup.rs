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
//! An absolute parent (`/runv`) is taken from each hierarchy's root; a relative
//! one (`runv-test`) from the agent's own cgroup in that hierarchy
//! (`/proc/self/cgroup`). The VMM joins its cgroup itself, in the forked child
//! before `exec` ([`super::process`]): this module creates, limits and removes
//! cgroups and never moves a process. It must not decide which VM gets which
//! limits.

use std::path::{Path, PathBuf};

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
                        std::thread::sleep(std::time::Duration::from_millis(10));
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
}
