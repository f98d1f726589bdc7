//! Guest console output made safe to print on an administrator's terminal:
//! a guest controls every byte of its serial log, and escape sequences
//! (cursor movement, window titles, OSC 52 clipboard writes, a fake prompt)
//! or bidirectional-text overrides must not reach the terminal as they are.
//! Every control character but newline and tab, and every bidi control, is
//! shown escaped (`\x1b`, `\u{202e}`); bytes that are not UTF-8 become U+FFFD.

/// `bytes` as text a terminal shows literally.
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            // C1 controls, and the bidi embeddings, overrides and isolates.
            '\u{80}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Prints a container's kept log (`runv-agent logs`): every kept file,
/// oldest first, each entry's text made safe as the console's is; with
/// `follow`, then what is written later, until the container ended and
/// its log has no more, or `stop` is set.
pub fn print_logs(
    log: &std::path::Path,
    run_record: &std::path::Path,
    follow: bool,
    out: &mut dyn std::io::Write,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use crate::host::logs::{DEFAULT_MAX_FILES, files, read_entries};
    use std::io::Read;
    let kept = files(log, DEFAULT_MAX_FILES);
    let (older, current) = match kept.split_last() {
        Some((c, o)) if c == log => (o, Some(c)),
        _ => (&kept[..], None),
    };
    for f in older {
        print_entries(&read_entries(&std::fs::read(f)?), out)?;
    }
    let Some(current) = current else {
        return Ok(());
    };
    let mut file = std::fs::File::open(current)?;
    let mut pending = Vec::new();
    loop {
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh)?;
        pending.extend_from_slice(&fresh);
        let whole = pending
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        print_entries(&read_entries(&pending[..whole]), out)?;
        pending.drain(..whole);
        out.flush()?;
        if !follow || stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let ended =
            crate::host::guest::RunRecord::read(run_record).is_some_and(|r| r.exited.is_some());
        if !fresh.is_empty() {
            continue;
        }
        if rotated(&file, log) {
            // What the old file still had was read above; go on in the new one.
            file = std::fs::File::open(log)?;
        } else if ended {
            return Ok(());
        } else {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

fn rotated(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() != b.ino(),
        _ => false,
    }
}

fn print_entries(
    entries: &[crate::host::logs::Entry],
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    for e in entries {
        out.write_all(sanitize(&e.text).as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn escapes_reach_the_terminal_only_as_text() {
        assert_eq!(sanitize(b"hello\tworld\n"), "hello\tworld\n");
        assert_eq!(
            sanitize(b"\x1b[2J\x1b]52;c;ZXZpbA==\x07"),
            "\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07"
        );
        assert_eq!(sanitize(b"a\rb\x7f"), "a\\x0db\\x7f");
        assert_eq!(
            sanitize("x\u{202e}gnp.exe\u{9b}".as_bytes()),
            "x\\u{202e}gnp.exe\\u{9b}"
        );
        assert_eq!(sanitize(b"\xff\xfe"), "\u{fffd}\u{fffd}");
        assert_eq!(sanitize("héllo ✓".as_bytes()), "héllo ✓");
    }

    #[test]
    fn logs_print_every_kept_file_in_order_and_follow_ends_with_the_container() {
        use crate::host::guest::RunRecord;
        use crate::host::logs::{LogFile, LogStream};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("current.log");
        let record = dir.path().join("run.json");
        let mut f = LogFile::new(log.clone(), 1024, 5);
        for i in 0..40 {
            f.write(LogStream::Stdout, format!("line {i:02}\n").as_bytes(), 0);
        }
        f.write(LogStream::Stderr, b"\x1b]52;c;evil\x07\n", 0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut out = Vec::new();
        super::print_logs(&log, &record, false, &mut out, &stop).unwrap();
        let text = String::from_utf8(out).unwrap();
        let want: String = (0..40).map(|i| format!("line {i:02}\n")).collect();
        assert_eq!(text, format!("{want}\\x1b]52;c;evil\\x07\n"));
        // Following a container that has ended prints what is there and returns.
        let ended = RunRecord {
            version: 1,
            exited: Some(runv_vmm_api::guest::Exited {
                code: Some(0),
                signal: None,
                oom_killed: false,
                start_error: None,
                started_at_nanos: 0,
                finished_at_nanos: 0,
            }),
            ..RunRecord::default()
        };
        std::fs::write(&record, serde_json::to_vec(&ended).unwrap()).unwrap();
        let mut out = Vec::new();
        super::print_logs(&log, &record, true, &mut out, &stop).unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with("evil\\x07\n"));
    }
}
