//! runv-vmm: a KVM microVM monitor, one process per microVM.
//!
//! Layout: [`kvm`] wraps every KVM ioctl; [`memory`] and [`boot`] lay out and
//! fill guest memory; [`devices`] emulate hardware; [`vcpu`] runs vCPU threads;
//! [`state`] and [`control`] are the shared run state and the control socket;
//! [`jail`] confines the process once its host resources are open;
//! [`vmm`] puts it together in boot order (docs/vmm-boot.md).

pub mod boot;
pub mod control;
pub mod counters;
pub mod devices;
pub mod jail;
pub mod kvm;
pub mod memory;
pub mod seccomp;
pub mod state;
pub mod vcpu;
pub mod vmm;

/// Path of the in-repo test guest with a PVH note (built by build.rs).
pub const TEST_GUEST_PVH: &str = env!("RUNV_GUEST_PVH");
/// Path of the in-repo test guest without a PVH note (64-bit entry).
pub const TEST_GUEST_64: &str = env!("RUNV_GUEST_64");

/// `e` and its sources on one line, `outer: inner: ...`: how the VMM reports
/// an error (exit record, stderr). A source whose text the line already ends
/// with is left out, for errors that print their source themselves.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = source.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("opening the thing")]
        Open(#[source] std::io::Error),
        #[error("loading: {0}")]
        Prints(#[source] std::io::Error),
    }

    #[test]
    fn the_chain_names_each_cause_once() {
        let io = || std::io::Error::other("no such file");
        assert_eq!(
            error_chain(&Outer::Open(io())),
            "opening the thing: no such file"
        );
        assert_eq!(error_chain(&Outer::Prints(io())), "loading: no such file");
    }
}
