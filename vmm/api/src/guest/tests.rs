use super::*;

fn config() -> GuestConfig {
    GuestConfig {
        version: CONFIG_VERSION,
        container: ContainerConfig {
            version: CONFIG_VERSION,
            image_id: "registry.example/app@sha256:00".into(),
            manifest_digest: "sha256:00".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec![DEFAULT_PATH.into()],
            working_dir: "/".into(),
            user: "app".into(),
        },
        hostname: "web-0".into(),
        rootfs: RootFs {
            source: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        network: Some(GuestNetwork {
            interface: "eth0".into(),
            address: "10.1.0.5/24".into(),
            gateway: Some("10.1.0.1".into()),
            nameservers: vec!["10.1.0.1".into()],
            search: vec![],
        }),
        termination_grace_period_seconds: 30,
        exit_report_timeout_seconds: 30,
    }
}

fn every_frame() -> Vec<Frame> {
    let exited = Exited {
        code: Some(3),
        signal: None,
        oom_killed: false,
        start_error: None,
        started_at_nanos: 1,
        finished_at_nanos: 2,
    };
    let started = Started {
        pid: 7,
        started_at_nanos: 1,
    };
    vec![
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "runv-init 0.1.0".into(),
            state: Some(GuestState::Running(started.clone())),
        }),
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "agent".into(),
            state: None,
        }),
        Frame::Config(Box::new(config())),
        Frame::Started(started),
        Frame::Stdout(b"out\n".to_vec()),
        Frame::Stderr(vec![0, 255, 10]),
        Frame::Exited(exited),
        Frame::Dropped(Dropped {
            stdout: 5,
            stderr: 0,
        }),
        Frame::Stop(Stop {
            grace_period_seconds: 2,
        }),
        Frame::ExitAck,
        Frame::Error("bad".into()),
    ]
}

#[test]
fn every_frame_survives_the_wire_whole_and_byte_by_byte() {
    let frames = every_frame();
    let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();

    let mut blocking = &wire[..];
    let mut read = Vec::new();
    while let Some(f) = read_frame(&mut blocking).unwrap() {
        read.push(f);
    }
    assert_eq!(read, frames);

    let mut d = Decoder::new();
    let mut pieces = Vec::new();
    for b in &wire {
        assert!(d.wanted() >= 1);
        d.push(std::slice::from_ref(b));
        while let Some(f) = d.next_frame().unwrap() {
            pieces.push(f);
        }
    }
    assert_eq!(pieces, frames);
    assert!(d.buf.is_empty(), "nothing of a frame left over");
}

#[test]
fn wanted_never_reaches_past_the_frame_being_read() {
    let wire = Frame::Stdout(vec![b'x'; 100]).encode();
    let mut d = Decoder::new();
    assert_eq!(d.wanted(), 4);
    d.push(&wire[..4]);
    assert_eq!(d.wanted(), 101);
    d.push(&wire[4..50]);
    assert_eq!(d.wanted(), 55);
    d.push(&wire[50..]);
    assert_eq!(
        d.next_frame().unwrap(),
        Some(Frame::Stdout(vec![b'x'; 100]))
    );
}

#[test]
fn hostile_frames_are_errors_that_name_the_fault() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0, 0, 0, 0], "a frame of 0 bytes"),
        (vec![0xff, 0xff, 0xff, 0xff], "a frame of 4294967295 bytes"),
        (vec![0, 0, 0, 1, 99], "unknown kind 99"),
        (
            vec![0, 0, 0, 3, KIND_EXITED, b'{', b'x'],
            "a Exited frame whose payload",
        ),
        (vec![0, 0, 0, 1, KIND_HELLO], "a Hello frame whose payload"),
    ];
    for (wire, want) in cases {
        let mut d = Decoder::new();
        d.push(&wire);
        let got = d.next_frame().unwrap_err().to_string();
        assert!(got.contains(want), "{got:?} lacks {want:?}");
        let got = read_frame(&mut &wire[..]).unwrap_err().to_string();
        assert!(got.contains(want), "{got:?} lacks {want:?}");
    }
    let cut = &Frame::Stdout(vec![1; 10]).encode()[..8];
    assert!(matches!(
        read_frame(&mut &cut[..]),
        Err(ProtoError::Truncated)
    ));
}

#[test]
fn random_bytes_never_panic_and_never_buffer_past_one_frame() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2_000 {
        let mut d = Decoder::new();
        for _ in 0..64 {
            let want = d.wanted().min(1 + (next() % 4096) as usize);
            let bytes: Vec<u8> = (0..want).map(|_| next() as u8).collect();
            d.push(&bytes);
            assert!(d.buf.len() <= 4 + MAX_FRAME);
            if d.next_frame().is_err() {
                break;
            }
        }
    }
}

#[test]
fn an_oversized_payload_is_cut_to_fit_a_frame() {
    let wire = Frame::Error("e".repeat(MAX_FRAME * 2)).encode();
    assert_eq!(wire.len(), 4 + MAX_FRAME);
    assert!(read_frame(&mut &wire[..]).unwrap().is_some());
}

#[test]
fn another_version_is_refused_with_both_numbers() {
    let err = check_hello(&Hello {
        version: 9,
        software: "x".into(),
        state: None,
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the peer speaks guest protocol version 9; this side speaks 1"
    );
}

#[test]
fn exit_codes_read_as_a_pods_do() {
    let e = |code, signal| Exited {
        code,
        signal,
        oom_killed: false,
        start_error: None,
        started_at_nanos: 0,
        finished_at_nanos: 0,
    };
    assert_eq!(e(Some(3), None).exit_code(), 3);
    assert_eq!(e(None, Some(9)).exit_code(), 137);
    assert_eq!(e(None, None).exit_code(), 128);
}

#[test]
fn hybrid_connect_reads_the_vmms_answer() {
    struct Fake {
        answer: &'static [u8],
        sent: Vec<u8>,
    }
    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            (&mut self.answer).read(buf)
        }
    }
    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut ok = Fake {
        answer: b"OK 1073741824\nrest",
        sent: vec![],
    };
    hybrid_connect(&mut ok, VSOCK_PORT).unwrap();
    assert_eq!(ok.sent, b"CONNECT 1024\n");
    assert_eq!(ok.answer, b"rest", "reads no byte past the line");
    let mut closed = Fake {
        answer: b"",
        sent: vec![],
    };
    let err = hybrid_connect(&mut closed, VSOCK_PORT).unwrap_err();
    assert!(
        err.to_string()
            .contains("nothing in the guest listens on vsock port 1024")
    );
}
