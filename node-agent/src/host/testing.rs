//! The one gate for tests that need the machine: `/dev/kvm`, root,
//! `/dev/net/tun`, `iptables`, `nft`. If something is missing the test skips with the
//! reason on stderr, except when `RUNV_REQUIRE_KVM=1` (CI), where it fails.
//!
//! Used by unit tests and integration tests alike; it changes nothing on the host.

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `/dev/kvm` opens read-write.
    Kvm,
    /// The test runs as root (network namespaces, taps, iptables).
    Root,
    /// `/dev/net/tun` opens read-write.
    Tun,
    /// An `iptables` program is installed.
    Iptables,
    /// An `nft` program (nftables) is installed.
    Nft,
}

/// Why `program --version` does not run, if it does not.
fn not_installed(program: &str) -> Option<String> {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    (!found).then(|| format!("{program} is not installed"))
}

fn missing(need: Need) -> Option<String> {
    let open = |path: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .err()
            .map(|e| format!("{path} cannot be opened: {e}"))
    };
    match need {
        Need::Kvm => open("/dev/kvm"),
        Need::Tun => open("/dev/net/tun"),
        // SAFETY: geteuid has no preconditions and cannot fail.
        Need::Root => (unsafe { libc::geteuid() } != 0).then(|| "not running as root".to_owned()),
        Need::Iptables => not_installed("iptables"),
        Need::Nft => not_installed("nft"),
    }
}

/// Whether the test can run. Prints why it skips; panics instead when
/// `RUNV_REQUIRE_KVM=1`.
pub fn require(test: &str, needs: &[Need]) -> bool {
    let why: Vec<String> = needs.iter().filter_map(|n| missing(*n)).collect();
    if why.is_empty() {
        return true;
    }
    let why = why.join("; ");
    if std::env::var("RUNV_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: required by RUNV_REQUIRE_KVM=1 but unavailable: {why}");
    }
    eprintln!("{test}: skipping: {why} (set RUNV_REQUIRE_KVM=1 to fail instead)");
    false
}
