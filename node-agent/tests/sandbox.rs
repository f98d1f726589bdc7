//! The VMM's sandbox is the node's, not the tenant's: through the real
//! `runv-agent standalone` and the real `runv-vmm`, a manifest that switches
//! off the jail or seccomp is refused (`SandboxNotAllowed`, naming the field
//! and the agent flag) unless the node's administrator started the agent
//! with that flag (or its environment form), and then it runs as asked.
//!
//! The refusals need nothing; the runs need /dev/kvm.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Agent, KillVmmOnDrop, recorded_pid, vmm_binary};
use runv_node_agent::testing::{Need, require};

const WAIT: Duration = Duration::from_secs(60);

/// A temp dir with the state root and one manifest; the paths as strings.
fn setup(name: &str, body: &str) -> (tempfile::TempDir, String, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join(format!("{name}.yaml"));
    std::fs::write(&file, body).unwrap();
    let root = tmp.path().join("root").display().to_string();
    let vmm = vmm_binary().display().to_string();
    (tmp, root, file.display().to_string(), vmm)
}

/// A test-guest VM that prints and powers off, with `isolation` appended.
fn manifest(name: &str, isolation: &str) -> String {
    common::manifest(name, "console=ttyS0", "Once") + &format!("  isolation: {isolation}\n")
}

#[test]
fn a_switched_off_sandbox_is_refused_unless_the_agent_allows_it() {
    for (name, isolation, field, flag, env) in [
        (
            "unjailed",
            "{ jail: Disabled }",
            "spec.isolation.jail",
            "--allow-jail-disabled",
            "RUNV_ALLOW_JAIL_DISABLED",
        ),
        (
            "unfiltered",
            "{ seccomp: Disabled }",
            "spec.isolation.seccomp",
            "--allow-seccomp-disabled",
            "RUNV_ALLOW_SECCOMP_DISABLED",
        ),
    ] {
        let (tmp, root, file, vmm) = setup(name, &manifest(name, isolation));
        let vm_dir = tmp.path().join(format!("root/vms/default_{name}"));
        let _guard = KillVmmOnDrop(vm_dir.clone());
        let mut refused = Agent::start(&["--root", &root, "standalone", &file, "--vmm", &vmm]);
        assert_eq!(refused.wait(WAIT), Some(1), "{}", refused.output());
        let out = refused.output();
        assert!(out.contains("reason=SandboxNotAllowed"), "{out}");
        assert!(
            out.contains(&format!("{name} Warning SandboxNotAllowed")),
            "{out}"
        );
        assert!(out.contains(field) && out.contains(flag), "{out}");
        assert_eq!(recorded_pid(&vm_dir), None, "a VMM was started: {out}");
        assert!(!vm_dir.join("config.json").exists(), "{out}");

        // The other flag allows only the other field.
        let other = if flag == "--allow-jail-disabled" {
            "--allow-seccomp-disabled"
        } else {
            "--allow-jail-disabled"
        };
        let mut still = Agent::start(&["--root", &root, other, "standalone", &file, "--vmm", &vmm]);
        assert_eq!(still.wait(WAIT), Some(1), "{}", still.output());
        assert!(still.output().contains("reason=SandboxNotAllowed"));

        if !require(
            "a_switched_off_sandbox_is_refused_unless_the_agent_allows_it",
            &[Need::Kvm],
        ) {
            continue;
        }
        // Allowed by the flag, and by its environment form: it runs as asked.
        let on = std::ffi::OsStr::new("true");
        for (args, envs) in [(vec![flag], vec![]), (vec![], vec![(env, on)])] {
            let mut argv = vec!["--root", root.as_str()];
            argv.extend(args);
            argv.extend(["standalone", &file, "--vmm", &vmm, "--timeout", "60"]);
            let agent = Path::new(env!("CARGO_BIN_EXE_runv-agent"));
            let mut allowed = Agent::spawn(agent, &argv, &envs);
            assert_eq!(
                allowed.wait(WAIT),
                Some(0),
                "{envs:?}: {}",
                allowed.output()
            );
            let out = allowed.output();
            assert!(
                out.contains(&format!("{name} | runv-guest: hello")),
                "{out}"
            );
            assert!(out.contains("phase=Succeeded ready=True"), "{out}");
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(vm_dir.join("config.json")).unwrap())
                    .unwrap();
            match field {
                "spec.isolation.jail" => assert!(config.get("jail").is_none(), "{config}"),
                _ => assert_eq!(config["seccomp"], false, "{config}"),
            }
        }
    }
}
