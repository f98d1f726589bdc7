//! runv-init as a host process: PID 1 of new mount, PID, UTS, IPC and
//! network namespaces (`unshare`), over the erofs root filesystem that the
//! node half (`runv-image`) made from a busybox image pulled from a real
//! registry on loopback. A unix socket stands in for vsock; the test is
//! the host end of the channel. One test gives it a network namespace of
//! its own with a veth pair, whose other end (the gateway) is in a second
//! namespace the test makes.

#[path = "../../../image/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use runv_image::container::{ImageConfig, Overrides, merge};
use runv_image::images::{Images, PullPolicy};
use runv_image::pull::parse_reference;
use runv_image::unpack::Limits;
use runv_image::{PullConfig, RegistryAuth};
use runv_vmm_api::guest::{
    self, ContainerConfig, Exited, Frame, GuestConfig, GuestState, Hello, PROTOCOL_VERSION, RootFs,
    Started, Stop,
};

/// How long any one step may take before the test gives up.
const STEP: Duration = Duration::from_secs(30);

struct Image {
    rootfs: PathBuf,
    config: ImageConfig,
    image_id: String,
    digest: String,
    _dir: tempfile::TempDir,
}

/// The busybox image, pushed, pulled and made a root filesystem once.
fn image() -> Option<&'static Image> {
    static IMAGE: OnceLock<Option<Image>> = OnceLock::new();
    IMAGE.get_or_init(build_image).as_ref()
}

fn build_image() -> Option<Image> {
    let tools = [
        "unshare",
        "ip",
        "docker-registry",
        "skopeo",
        "mkfs.erofs",
        "busybox",
    ];
    if !support::require_tools("runv-init host-process tests", &tools) {
        return None;
    }
    let root = nix::unistd::geteuid().is_root();
    let ci = std::env::var("RUNV_REQUIRE_KVM").as_deref() == Ok("1");
    if !root {
        assert!(
            !ci,
            "runv-init host-process tests need root in CI (namespaces, mounts)"
        );
        eprintln!("runv-init host-process tests: skipping: they need root to mount");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut layout = support::Layout::new(&dir.path().join("layout"));
    let desc = support::busybox_image(&layout);
    layout.tag(&desc, "v1");
    let registry = support::Registry::start(None);
    registry.push(&layout.dir, "v1", "busybox", &[]);
    let reference = parse_reference(&format!("{}/busybox:v1", registry.addr)).unwrap();
    let images = Images::open(
        &dir.path().join("node"),
        PullConfig::default(),
        Limits::default(),
        Default::default(),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ready = rt
        .block_on(images.ensure(
            &reference,
            &RegistryAuth::Anonymous,
            PullPolicy::IfNotPresent,
        ))
        .unwrap();
    Some(Image {
        rootfs: ready.rootfs,
        config: ready.config,
        image_id: format!("{}@{}", reference.whole(), ready.pulled.manifest_digest),
        digest: ready.pulled.manifest_digest.to_string(),
        _dir: dir,
    })
}

/// A guest config for `sh -c SCRIPT` as `user`, merged by the node half's
/// rules with `SPEC_VAR=from-spec` and working directory `/home/app`.
fn config(img: &Image, user: &str, argv: &[&str]) -> GuestConfig {
    let overrides = Overrides {
        command: argv.iter().map(|s| s.to_string()).collect(),
        args: vec![],
        env: vec![("SPEC_VAR".into(), "from-spec".into())],
        working_dir: Some("/home/app".into()),
    };
    let mut container: ContainerConfig =
        merge(&img.config, &overrides, &img.image_id, &img.digest).unwrap();
    container.user = user.into();
    GuestConfig {
        version: guest::CONFIG_VERSION,
        container,
        hostname: "web-0".into(),
        rootfs: RootFs {
            source: img.rootfs.to_string_lossy().into_owned(),
            fstype: "erofs".into(),
        },
        network: None,
        termination_grace_period_seconds: 30,
        exit_report_timeout_seconds: 30,
    }
}

fn sh(img: &Image, user: &str, script: &str) -> GuestConfig {
    config(img, user, &["/bin/sh", "-c", script])
}

/// One runv-init in its namespaces, and the socket it connects to.
struct Guest {
    child: Child,
    listener: UnixListener,
    _dir: tempfile::TempDir,
}

impl Guest {
    fn start() -> Guest {
        Self::start_in(None)
    }

    /// runv-init in new namespaces; in the network namespace `netns` (made
    /// by `ip netns add`) when one is given, else a new, empty one.
    fn start_in(netns: Option<&str>) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("channel.sock");
        let stage = dir.path().join("stage");
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => {
                let mut c = Command::new("unshare");
                c.arg("--net");
                c
            }
        };
        let child = cmd
            .args(["--fork", "--pid", "--mount", "--uts", "--ipc"])
            .args(["--propagation", "private"])
            .arg(env!("CARGO_BIN_EXE_runv-init"))
            .arg(format!("runv.channel=unix:{}", sock.display()))
            .arg(format!("runv.stage={}", stage.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Guest {
            child,
            listener,
            _dir: dir,
        }
    }

    /// The next connection from the guest.
    fn accept(&mut self) -> Host {
        let deadline = Instant::now() + STEP;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(STEP)).unwrap();
                    return Host(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(status) = self.child.try_wait().unwrap() {
                        panic!("runv-init ended ({status:?}) before it connected");
                    }
                    assert!(Instant::now() < deadline, "runv-init never connected");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Waits for runv-init to power off: PID 1 of a PID namespace that
    /// calls reboot(POWER_OFF) ends the namespace as if by SIGINT.
    fn powered_off(mut self) {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
                return;
            }
            assert!(Instant::now() < deadline, "runv-init did not power off");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The host pid of runv-init (the child of `unshare`).
    fn init_pid(&self) -> i32 {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The host end of one connection.
struct Host(UnixStream);

/// What one run of a container told the host.
#[derive(Debug, Default)]
struct Run {
    started: Option<Started>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    errors: Vec<String>,
    exited: Option<Exited>,
}

impl Host {
    fn send(&mut self, f: &Frame) {
        guest::write_frame(&mut self.0, f).unwrap();
    }

    fn recv(&mut self) -> Option<Frame> {
        guest::read_frame(&mut self.0).unwrap()
    }

    /// Reads the guest's Hello and answers with ours.
    fn greet(&mut self) -> Hello {
        let Some(Frame::Hello(h)) = self.recv() else {
            panic!("the guest did not start with Hello");
        };
        assert_eq!(h.version, PROTOCOL_VERSION);
        self.send(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
            state: None,
        }));
        h
    }

    /// Greets, sends `config`, and reads until Exited (acknowledging it
    /// when `ack`).
    fn run(&mut self, config: GuestConfig, ack: bool) -> Run {
        let hello = self.greet();
        assert_eq!(hello.state, Some(GuestState::WaitingForConfig));
        self.send(&Frame::Config(Box::new(config)));
        self.until_exited(Run::default(), ack)
    }

    fn until_exited(&mut self, mut run: Run, ack: bool) -> Run {
        while run.exited.is_none() {
            match self.recv().expect("the channel ended before Exited") {
                Frame::Started(s) => run.started = Some(s),
                Frame::Stdout(b) => run.stdout.extend(b),
                Frame::Stderr(b) => run.stderr.extend(b),
                Frame::Error(e) => run.errors.push(e),
                Frame::Exited(e) => run.exited = Some(e),
                other => panic!("unexpected {other:?}"),
            }
        }
        if ack {
            self.send(&Frame::ExitAck);
        }
        run
    }

    /// Reads stdout until `marker` appears.
    fn wait_for_stdout(&mut self, marker: &str) -> Run {
        let mut run = Run::default();
        while !String::from_utf8_lossy(&run.stdout).contains(marker) {
            match self.recv().expect("the channel ended") {
                Frame::Started(s) => run.started = Some(s),
                Frame::Stdout(b) => run.stdout.extend(b),
                Frame::Stderr(b) => run.stderr.extend(b),
                other => panic!("unexpected {other:?} before {marker:?}"),
            }
        }
        run
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn exited(run: &Run) -> &Exited {
    run.exited.as_ref().unwrap()
}

#[test]
fn the_entrypoint_runs_with_its_env_args_working_directory_and_user() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let script = "echo \"uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME\"; \
                  echo \"pwd=$(pwd) image=$IMAGE_VAR spec=$SPEC_VAR host=$(hostname)\"; \
                  cat /etc/image-release; \
                  echo written > /home/app/new && cat /home/app/new; \
                  grep web-0 /etc/hosts; \
                  echo to-stderr >&2; exit 3";
    let run = guest.accept().run(sh(img, "app", script), true);
    assert_eq!(
        text(&run.stdout),
        "uid=1000 gid=1000 groups=1000 1001 home=/home/app\n\
         pwd=/home/app image=from-image spec=from-spec host=web-0\n\
         busybox-test\n\
         written\n\
         127.0.1.1\tweb-0\n"
    );
    assert_eq!(text(&run.stderr), "to-stderr\n");
    let e = exited(&run);
    assert_eq!((e.code, e.signal, e.oom_killed), (Some(3), None, false));
    let started = run.started.as_ref().expect("Started came before Exited");
    assert!(started.pid > 1, "the container is a child of PID 1");
    assert!(e.finished_at_nanos >= started.started_at_nanos);
    guest.powered_off();
}

#[test]
fn the_image_stays_read_only_below_its_overlay() {
    let Some(img) = image() else { return };
    let before = std::fs::read(&img.rootfs).unwrap();
    let mut guest = Guest::start();
    let script = "rm /etc/image-release && echo gone > /etc/new && cat /etc/new; \
                  ls /etc/image-release 2>&1; \
                  grep -c ' / overlay ' /proc/mounts";
    let run = guest.accept().run(sh(img, "", script), true);
    let out = text(&run.stdout);
    assert!(out.starts_with("gone\n"), "{out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(out.ends_with("1\n"), "the root is an overlay: {out}");
    assert_eq!(exited(&run).code, Some(0));
    guest.powered_off();
    assert!(
        std::fs::read(&img.rootfs).unwrap() == before,
        "the image file is untouched"
    );
}

#[test]
fn etc_files_replace_links_in_the_image_and_never_follow_them() {
    let Some(img) = image() else { return };
    let escape = std::path::Path::new("/tmp/runv-escape-resolv.conf");
    let _ = std::fs::remove_file(escape);
    let mut guest = Guest::start();
    let mut config = sh(
        img,
        "",
        "[ -L /etc/resolv.conf ] && echo link || echo file; cat /etc/resolv.conf",
    );
    config.network = None;
    let run = guest.accept().run(config, true);
    assert_eq!(
        text(&run.stdout),
        "file\n",
        "an empty resolv.conf, a file of its own"
    );
    guest.powered_off();
    assert!(
        !escape.exists(),
        "nothing was written through the image's link"
    );
}

/// A network namespace with a veth pair: `eth0` inside, `peer` (with
/// `10.99.X.1/24`) outside it, in the same namespace's other end; removed
/// on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: u8) -> Netns {
        let name = format!("runv-init-{}-{tag}", std::process::id());
        let ip = |args: &[&str]| support::run(Command::new("ip").args(args));
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        let peer = format!("rvi{tag}p{}", std::process::id() % 10_000);
        ip(&[
            "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        // The gateway end lives in a namespace of its own, beside the guest's.
        let gw = format!("{}-gw", ns.name);
        ip(&["netns", "add", &gw]);
        ip(&["link", "set", &peer, "netns", &gw]);
        let exec = |args: &[&str]| {
            support::run(
                Command::new("ip")
                    .args(["netns", "exec", &gw, "ip"])
                    .args(args),
            )
        };
        exec(&["addr", "add", &format!("10.99.{tag}.1/24"), "dev", &peer]);
        exec(&["link", "set", &peer, "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [self.name.clone(), format!("{}-gw", self.name)] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

#[test]
fn eth0_gets_its_address_route_and_name_servers() {
    let Some(img) = image() else { return };
    let ns = Netns::new(7);
    let mut guest = Guest::start_in(Some(&ns.name));
    let mut config = sh(
        img,
        "",
        "ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; ip route | grep default; \
         cat /etc/resolv.conf; grep web-0 /etc/hosts; \
         ping -c 1 -W 5 10.99.7.1 >/dev/null && echo gateway-answers",
    );
    config.network = Some(guest::GuestNetwork {
        interface: "eth0".into(),
        address: "10.99.7.2/24".into(),
        gateway: Some("10.99.7.1".into()),
        nameservers: vec!["10.99.7.1".into()],
        search: vec!["default.svc.test".into()],
    });
    let run = guest.accept().run(config, true);
    assert_eq!(
        text(&run.stdout),
        "inet 10.99.7.2/24\n\
         default via 10.99.7.1 dev eth0 \n\
         search default.svc.test\nnameserver 10.99.7.1\n\
         10.99.7.2\tweb-0\n\
         gateway-answers\n",
        "{}",
        text(&run.stderr)
    );
    guest.powered_off();
}

#[test]
fn exit_codes_and_signals_are_reported_as_they_happened() {
    let Some(img) = image() else { return };
    for (script, code, signal) in [
        ("exit 0", Some(0), None),
        ("exit 42", Some(42), None),
        // `$$$$` is the shell's `$$` once Kubernetes' `$(VAR)` expansion of
        // the command has turned `$$` into `$`.
        ("kill -KILL $$$$", None, Some(libc::SIGKILL)),
        ("kill -SEGV $$$$", None, Some(libc::SIGSEGV)),
    ] {
        let mut guest = Guest::start();
        let run = guest.accept().run(sh(img, "", script), true);
        let e = exited(&run);
        assert_eq!(
            (e.code, e.signal),
            (code, signal),
            "{script}: {}",
            text(&run.stderr)
        );
        assert!(e.start_error.is_none());
        guest.powered_off();
    }
}

#[test]
fn orphans_are_reaped_by_pid_1() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    // Each subshell leaves a `sleep 0` behind, reparented to PID 1, which
    // must reap it; a zombie shows as "State: Z" in /proc.
    let script = "i=0; while [ $i -lt 30 ]; do (sleep 0 &); i=$((i+1)); done; sleep 1; \
                  echo zombies=$(grep -l '^State:.Z' /proc/[0-9]*/status 2>/dev/null | wc -l)";
    let run = guest.accept().run(sh(img, "", script), true);
    assert_eq!(text(&run.stdout), "zombies=0\n");
    guest.powered_off();
}

#[test]
fn what_the_container_leaves_running_ends_with_it() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let script = "sleep 1000 & echo started-background; exit 5";
    let run = guest.accept().run(sh(img, "", script), true);
    assert_eq!(text(&run.stdout), "started-background\n");
    assert_eq!(exited(&run).code, Some(5));
    // runv-init only powers off once no process is left to hold output.
    guest.powered_off();
}

#[test]
fn stdout_and_stderr_stay_apart_and_in_order() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let script = "i=0; while [ $i -lt 200 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done";
    let run = guest.accept().run(sh(img, "", script), true);
    let want = |p: &str| (0..200).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(text(&run.stdout), want("out"));
    assert_eq!(text(&run.stderr), want("err"));
    guest.powered_off();
}

#[test]
fn a_stop_sends_sigterm_and_the_container_ends_its_own_way() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let mut host = guest.accept();
    host.greet();
    let script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done";
    host.send(&Frame::Config(Box::new(sh(img, "", script))));
    let before = host.wait_for_stdout("ready");
    host.send(&Frame::Stop(Stop {
        grace_period_seconds: 30,
    }));
    let run = host.until_exited(before, true);
    assert_eq!(text(&run.stdout), "ready\ngot-term\n");
    assert_eq!(exited(&run).code, Some(7));
    guest.powered_off();
}

#[test]
fn a_container_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let mut host = guest.accept();
    host.greet();
    let script = "trap '' TERM; echo ready; while :; do sleep 0.1; done";
    host.send(&Frame::Config(Box::new(sh(img, "", script))));
    let before = host.wait_for_stdout("ready");
    host.send(&Frame::Stop(Stop {
        grace_period_seconds: 1,
    }));
    let run = host.until_exited(before, true);
    assert_eq!(exited(&run).signal, Some(libc::SIGKILL));
    assert_eq!(exited(&run).code, None);
    guest.powered_off();
}

#[test]
fn the_power_button_stops_the_container_with_its_grace_period() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let mut host = guest.accept();
    host.greet();
    let script = "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done";
    host.send(&Frame::Config(Box::new(sh(img, "", script))));
    let before = host.wait_for_stdout("ready");
    // What a VMM's power button or Ctrl-Alt-Del becomes for PID 1.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(guest.init_pid()),
        nix::sys::signal::Signal::SIGPWR,
    )
    .unwrap();
    let run = host.until_exited(before, true);
    assert_eq!(text(&run.stdout), "ready\ngot-term\n");
    assert_eq!(exited(&run).code, Some(0));
    guest.powered_off();
}

#[test]
fn a_container_that_cannot_start_is_reported_with_the_reason() {
    let Some(img) = image() else { return };
    let cases = [
        (config(img, "", &["/bin/no-such-program"]), "No such file"),
        (sh(img, "ghost", "true"), "unable to find user ghost"),
        (
            {
                let mut c = sh(img, "", "true");
                c.container.working_dir = "/nowhere".into();
                c
            },
            "the working directory \"/nowhere\" does not exist",
        ),
    ];
    for (config, want) in cases {
        let mut guest = Guest::start();
        let run = guest.accept().run(config, true);
        let e = exited(&run);
        let why = e.start_error.as_deref().unwrap_or_default();
        assert!(why.contains(want), "{why:?} lacks {want:?}");
        assert_eq!(e.exit_code(), 128);
        assert!(
            run.errors.iter().any(|m| m.contains(want)),
            "{:?}",
            run.errors
        );
        assert!(run.started.is_none());
        guest.powered_off();
    }
}

#[test]
fn without_an_acknowledgement_it_powers_off_after_the_report_timeout() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let mut config = sh(img, "", "exit 0");
    config.exit_report_timeout_seconds = 1;
    let mut host = guest.accept();
    let run = host.run(config, false);
    assert_eq!(exited(&run).code, Some(0));
    guest.powered_off();
}

#[test]
fn a_host_that_reconnects_learns_the_state_and_gets_the_output_it_missed() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    let mut first = guest.accept();
    first.greet();
    let script = "echo ready; sleep 1; echo while-away; exit 4";
    first.send(&Frame::Config(Box::new(sh(img, "", script))));
    first.wait_for_stdout("ready");
    drop(first);
    let mut second = guest.accept();
    let hello = second.greet();
    assert!(
        matches!(hello.state, Some(GuestState::Running(_))),
        "{:?}",
        hello.state
    );
    let run = second.until_exited(Run::default(), true);
    assert!(
        text(&run.stdout).contains("while-away"),
        "{}",
        text(&run.stdout)
    );
    assert_eq!(exited(&run).code, Some(4));
    guest.powered_off();
}

/// Reads frames until the guest closes the connection; returns its errors.
fn errors_until_closed(host: &mut Host) -> Vec<String> {
    let mut errors = Vec::new();
    loop {
        match guest::read_frame(&mut host.0) {
            Ok(Some(Frame::Error(e))) => errors.push(e),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return errors,
        }
    }
}

#[test]
fn a_hostile_peer_is_cut_off_and_the_next_one_is_served() {
    let Some(img) = image() else { return };
    let mut guest = Guest::start();
    type Attack = Box<dyn Fn(&mut Host)>;
    let hostile: [(&str, Attack); 5] = [
        (
            "a frame of 4294967295 bytes",
            Box::new(|h| h.0.write_all(&[0xff; 4]).unwrap()),
        ),
        (
            "unknown kind 200",
            Box::new(|h| h.0.write_all(&[0, 0, 0, 1, 200]).unwrap()),
        ),
        (
            "a Config frame before Hello",
            Box::new(|h| h.send(&Frame::Config(Box::new(sh(image().unwrap(), "", "true"))))),
        ),
        (
            "the peer speaks guest protocol version 99",
            Box::new(|h| {
                h.send(&Frame::Hello(Hello {
                    version: 99,
                    software: "x".into(),
                    state: None,
                }))
            }),
        ),
        (
            "a Stdout frame, which this side of the channel never receives",
            Box::new(|h| {
                h.send(&Frame::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    software: "x".into(),
                    state: None,
                }));
                h.send(&Frame::Stdout(b"forged".to_vec()));
            }),
        ),
    ];
    for (want, attack) in hostile {
        let mut host = guest.accept();
        let Some(Frame::Hello(_)) = host.recv() else {
            panic!("no Hello")
        };
        attack(&mut host);
        let errors = errors_until_closed(&mut host);
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{errors:?} lacks {want:?}"
        );
    }
    let run = guest.accept().run(sh(img, "", "echo served"), true);
    assert_eq!(text(&run.stdout), "served\n");
    guest.powered_off();
}
