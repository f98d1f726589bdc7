//! Developer conveniences for a source checkout, so that the README's first
//! command (`cargo run -q -p runv-node-agent -- standalone
//! examples/microvm-minimal.yaml`) works on a fresh clone: build `runv-vmm`
//! with cargo, and install the in-repo test guest where the examples expect
//! it.
//!
//! Compiled only into debug builds (what `cargo run` makes) and with the
//! `testing` feature (tests, the benchmark): a release `runv-agent` runs no
//! cargo and installs no guest. That is also why this module may write a
//! file itself, outside [`crate::host`]: it acts on a developer's machine,
//! never on a node.

use std::io::Write;
use std::path::{Path, PathBuf};

use runv_crds::MicroVM;

/// Where the in-repo test guest is expected by the examples.
pub const TEST_GUEST_PATH: &str = "/var/lib/runv/guests/runv-test-guest";

/// Why a developer convenience failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Cargo could not be run.
    #[error("running cargo build -p runv-vmm")]
    Cargo(#[source] std::io::Error),
    /// Cargo ran and failed.
    #[error("cargo build -p runv-vmm failed ({0})")]
    Build(std::process::ExitStatus),
}

/// Under `cargo run` in a source tree (cargo sets `CARGO` for the program it
/// runs), builds `runv-vmm` into the same target directory as this executable.
pub fn build_vmm_from_source() -> Result<Option<PathBuf>, DevError> {
    let (Some(cargo), Ok(exe)) = (std::env::var_os("CARGO"), std::env::current_exe()) else {
        return Ok(None);
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !workspace.join("vmm/Cargo.toml").is_file() {
        return Ok(None);
    }
    let release = exe
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release");
    eprintln!("runv-agent: building runv-vmm (cargo build -p runv-vmm)");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", "runv-vmm", "--bin", "runv-vmm"])
        .current_dir(&workspace);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(DevError::Cargo)?;
    if !status.success() {
        return Err(DevError::Build(status));
    }
    Ok(exe
        .parent()
        .map(|d| d.join("runv-vmm"))
        .filter(|p| p.is_file()))
}

/// The in-repo test guest (with its PVH note) as the VMM's build script left
/// it in the cargo target directory that holds `exe`: the newest
/// `build/runv-vmm-*/out/runv-guest-pvh.elf` beside it or up to two levels above.
pub fn find_test_guest(exe: &Path) -> Option<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for dir in exe.ancestors().skip(1).take(3) {
        let Ok(entries) = std::fs::read_dir(dir.join("build")) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if !e.file_name().to_string_lossy().starts_with("runv-vmm-") {
                continue;
            }
            let elf = e.path().join("out/runv-guest-pvh.elf");
            if let Ok(t) = elf.metadata().and_then(|m| m.modified())
                && best.as_ref().is_none_or(|(bt, _)| t > *bt)
            {
                best = Some((t, elf));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Installs the in-repo test guest where the examples expect it when a VM
/// asks for it: when it is missing, or older than the one the build made (so
/// a checkout that changed the guest does not keep running the old one).
/// Returns whether it wrote the file.
pub fn provide_test_guest(vms: &[MicroVM], out: &mut dyn Write) -> std::io::Result<bool> {
    if !vms.iter().any(|v| v.spec.boot.kernel == TEST_GUEST_PATH) {
        return Ok(false);
    }
    let dest = Path::new(TEST_GUEST_PATH);
    let Some(built) = std::env::current_exe()
        .ok()
        .and_then(|exe| find_test_guest(&exe))
    else {
        if !dest.exists() {
            writeln!(
                out,
                "{TEST_GUEST_PATH} does not exist and no built test guest was found (cargo build -p runv-vmm makes one)"
            )?;
        }
        return Ok(false);
    };
    let Some(what) = install_guest(&built, dest)? else {
        return Ok(false);
    };
    writeln!(
        out,
        "{what} the runv test guest at {TEST_GUEST_PATH} (built from vmm/guest)"
    )?;
    Ok(true)
}

/// Copies `built` to `dest` unless `dest` already holds the same bytes; the
/// new file replaces the old one atomically (VMMs running the old one have
/// loaded it already). Returns "installed", "updated" or None.
fn install_guest(built: &Path, dest: &Path) -> std::io::Result<Option<&'static str>> {
    let image = std::fs::read(built)?;
    let what = match std::fs::read(dest) {
        Ok(old) if old == image => return Ok(None),
        Ok(_) => "updated",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "installed",
        Err(e) => return Err(e),
    };
    let dir = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".runv-test-guest.{}", std::process::id()));
    std::fs::write(&tmp, &image)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&tmp, dest)?;
    Ok(Some(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_guest_is_installed_then_updated_only_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let built = dir.path().join("built.elf");
        let dest = dir.path().join("guests/runv-test-guest");
        std::fs::write(&built, b"guest v1").unwrap();
        assert_eq!(install_guest(&built, &dest).unwrap(), Some("installed"));
        assert_eq!(install_guest(&built, &dest).unwrap(), None);
        std::fs::write(&built, b"guest v2").unwrap();
        assert_eq!(install_guest(&built, &dest).unwrap(), Some("updated"));
        assert_eq!(std::fs::read(&dest).unwrap(), b"guest v2");
        let mode = std::os::unix::fs::PermissionsExt::mode(&dest.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
