//! runv-init's own settings: `runv.*` words from the kernel command line
//! (`/proc/cmdline`) or, when run as a host process in tests, from its
//! arguments. Pure.

use std::path::PathBuf;

/// Where the host end of the channel is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelAddr {
    /// Listen on this AF_VSOCK port (runv-vmm's hybrid vsock).
    Vsock(u32),
    /// The virtio-console port with this name (QEMU's virtserialport).
    Port(String),
    /// Connect to this unix socket (runv-init as a host process in tests).
    Unix(PathBuf),
}

/// What runv-init was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `runv.channel=vsock:PORT|port:NAME|unix:PATH`.
    pub channel: ChannelAddr,
    /// `runv.modules=DIR`: the modules and their `order` file.
    pub modules: PathBuf,
    /// `runv.stage=DIR`: where the new root is put together.
    pub stage: PathBuf,
    /// Words that looked like ours but were not understood.
    pub unknown: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            channel: ChannelAddr::Vsock(runv_vmm_api::guest::VSOCK_PORT),
            modules: PathBuf::from("/lib/modules/runv"),
            stage: PathBuf::from("/runv"),
            unknown: Vec::new(),
        }
    }
}

impl Settings {
    /// Reads `runv.*` words; later words win.
    pub fn parse<'a>(words: impl IntoIterator<Item = &'a str>) -> Settings {
        let mut s = Settings::default();
        for word in words {
            let Some(rest) = word.strip_prefix("runv.") else {
                continue;
            };
            let ok = match rest.split_once('=') {
                Some(("channel", v)) => parse_channel(v).map(|c| s.channel = c).is_some(),
                Some(("modules", v)) if !v.is_empty() => {
                    s.modules = v.into();
                    true
                }
                Some(("stage", v)) if v.starts_with('/') => {
                    s.stage = v.into();
                    true
                }
                _ => false,
            };
            if !ok {
                s.unknown.push(word.to_owned());
            }
        }
        s
    }
}

fn parse_channel(v: &str) -> Option<ChannelAddr> {
    match v.split_once(':')? {
        ("vsock", port) => port.parse().ok().map(ChannelAddr::Vsock),
        ("port", name) if !name.is_empty() && !name.contains('/') => {
            Some(ChannelAddr::Port(name.to_owned()))
        }
        ("unix", path) if path.starts_with('/') => Some(ChannelAddr::Unix(path.into())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_of_the_kernel_command_line_set_what_they_name() {
        let s = Settings::parse(
            "console=ttyS0 panic=-1 runv.channel=port:runv.0 runv.modules=/m runv.stage=/s"
                .split_whitespace(),
        );
        assert_eq!(s.channel, ChannelAddr::Port("runv.0".into()));
        assert_eq!(s.modules, PathBuf::from("/m"));
        assert_eq!(s.stage, PathBuf::from("/s"));
        assert!(s.unknown.is_empty());
    }

    #[test]
    fn defaults_are_the_vms() {
        let s = Settings::parse(["quiet"]);
        assert_eq!(s.channel, ChannelAddr::Vsock(1024));
        assert_eq!(s.stage, PathBuf::from("/runv"));
    }

    #[test]
    fn words_it_cannot_read_are_kept_to_be_reported() {
        let s = Settings::parse([
            "runv.channel=tcp:1",
            "runv.stage=relative",
            "runv.channel=unix:rel",
            "runv.channel=vsock:x",
            "runv.bogus=1",
            "runv.channel=unix:/run/c.sock",
        ]);
        assert_eq!(s.channel, ChannelAddr::Unix("/run/c.sock".into()));
        assert_eq!(s.unknown.len(), 5);
    }
}
