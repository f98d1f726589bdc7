//! Container logs as kubelet keeps them: the CRI log format, one line per
//! entry (`<RFC 3339 time> <stdout|stderr> <F|P> <text>`, `P` for a part of
//! a line longer than [`MAX_LINE`]), in a file rotated at a size bound with
//! a bounded number of older files (`NAME.1` the newest of them).
//!
//! Reading ([`read_entries`]) strips the prefix again, for `runv-agent logs`.

use std::io::Write;
use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;
use runv_vmm_api::guest::Dropped;

/// A line longer than this is written in parts.
pub const MAX_LINE: usize = 16 * 1024;
/// kubelet's defaults (`containerLogMaxSize`, `containerLogMaxFiles`).
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Files kept, the current one included.
pub const DEFAULT_MAX_FILES: u32 = 5;

/// Which stream an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

impl LogStream {
    fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// One container's log file, written as output arrives.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: Option<std::fs::File>,
    size: u64,
    /// The unfinished line of each stream.
    partial: [Vec<u8>; 2],
}

fn stamp(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
}

impl LogFile {
    /// A log at `path`, rotated past `max_bytes` into `max_files - 1` older files.
    pub fn new(path: PathBuf, max_bytes: u64, max_files: u32) -> Self {
        Self {
            path,
            max_bytes: max_bytes.max(1024),
            max_files: max_files.max(1),
            file: None,
            size: 0,
            partial: [Vec::new(), Vec::new()],
        }
    }

    /// Appends what a stream wrote at `now_ms`: whole lines now, the rest
    /// when its line ends (or grows past [`MAX_LINE`]).
    pub fn write(&mut self, stream: LogStream, bytes: &[u8], now_ms: i64) {
        let i = stream as usize;
        let mut buf = std::mem::take(&mut self.partial[i]);
        buf.extend_from_slice(bytes);
        let mut rest = &buf[..];
        while let Some(n) = rest.iter().position(|b| *b == b'\n') {
            self.entry(stream, 'F', &rest[..n], now_ms);
            rest = &rest[n + 1..];
        }
        while rest.len() > MAX_LINE {
            self.entry(stream, 'P', &rest[..MAX_LINE], now_ms);
            rest = &rest[MAX_LINE..];
        }
        self.partial[i] = rest.to_vec();
    }

    /// Writes out unfinished lines (the container ended).
    pub fn flush(&mut self, now_ms: i64) {
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let line = std::mem::take(&mut self.partial[stream as usize]);
            if !line.is_empty() {
                self.entry(stream, 'F', &line, now_ms);
            }
        }
    }

    /// Notes, in the log, output the guest dropped.
    pub fn note_dropped(&mut self, d: Dropped, now_ms: i64) {
        for (stream, n) in [(LogStream::Stdout, d.stdout), (LogStream::Stderr, d.stderr)] {
            if n > 0 {
                let note = format!(
                    "[runv: {n} bytes of {} dropped in the guest]",
                    stream.as_str()
                );
                self.entry(stream, 'F', note.as_bytes(), now_ms);
            }
        }
    }

    fn entry(&mut self, stream: LogStream, tag: char, text: &[u8], now_ms: i64) {
        let mut line = format!("{} {} {tag} ", stamp(now_ms), stream.as_str()).into_bytes();
        line.extend_from_slice(text);
        line.push(b'\n');
        if self.file.is_none() || self.size + line.len() as u64 > self.max_bytes {
            self.rotate();
        }
        if let Some(f) = &mut self.file {
            if f.write_all(&line).is_ok() {
                self.size += line.len() as u64;
            } else {
                self.file = None;
            }
        }
    }

    /// Opens the file; when it is full, shifts `NAME.k` to `NAME.k+1`
    /// (dropping the oldest) and starts a new one.
    fn rotate(&mut self) {
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size > 0 && (self.file.is_some() || size >= self.max_bytes) {
            self.file = None;
            for k in (1..self.max_files).rev() {
                let from = if k == 1 {
                    self.path.clone()
                } else {
                    numbered(&self.path, k - 1)
                };
                let _ = std::fs::rename(from, numbered(&self.path, k));
            }
            if self.max_files == 1 {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok();
        self.size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
    }
}

/// `NAME.k`.
pub fn numbered(path: &Path, k: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{k}"));
    PathBuf::from(s)
}

/// The files of a log, oldest first.
pub fn files(path: &Path, max_files: u32) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..max_files.max(1))
        .rev()
        .map(|k| numbered(path, k))
        .filter(|p| p.is_file())
        .collect();
    if path.is_file() {
        out.push(path.to_owned());
    }
    out
}

/// One entry read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When the agent received it (RFC 3339).
    pub time: String,
    /// Its stream.
    pub stream: LogStream,
    /// Its text, with the newline when the line ended (`F`).
    pub text: Vec<u8>,
}

/// Parses CRI log lines; lines that are not entries are skipped.
pub fn read_entries(bytes: &[u8]) -> Vec<Entry> {
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let mut parts = line.splitn(4, |b| *b == b' ');
            let time = String::from_utf8(parts.next()?.to_vec()).ok()?;
            let stream = match parts.next()? {
                b"stdout" => LogStream::Stdout,
                b"stderr" => LogStream::Stderr,
                _ => return None,
            };
            let full = match parts.next()? {
                b"F" => true,
                b"P" => false,
                _ => return None,
            };
            let mut text = parts.next().unwrap_or_default().to_vec();
            if full {
                text.push(b'\n');
            }
            Some(Entry { time, stream, text })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path, files_kept: u32) -> Vec<Entry> {
        files(path, files_kept)
            .iter()
            .flat_map(|p| read_entries(&std::fs::read(p).unwrap()))
            .collect()
    }

    fn text(entries: &[Entry], stream: LogStream) -> String {
        entries
            .iter()
            .filter(|e| e.stream == stream)
            .map(|e| String::from_utf8_lossy(&e.text).into_owned())
            .collect()
    }

    #[test]
    fn lines_are_kept_whole_per_stream_however_they_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut log = LogFile::new(path.clone(), DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES);
        log.write(LogStream::Stdout, b"hel", 1);
        log.write(LogStream::Stderr, b"oops\n", 2);
        log.write(LogStream::Stdout, b"lo\nwor", 3);
        log.write(LogStream::Stdout, b"ld", 4);
        log.flush(5);
        let e = read_all(&path, DEFAULT_MAX_FILES);
        assert_eq!(text(&e, LogStream::Stdout), "hello\nworld\n");
        assert_eq!(text(&e, LogStream::Stderr), "oops\n");
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(
            raw.starts_with("1970-01-01T00:00:00.002Z stderr F oops\n"),
            "{raw}"
        );
    }

    #[test]
    fn a_line_without_end_is_written_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut log = LogFile::new(path.clone(), DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES);
        log.write(LogStream::Stdout, &vec![b'x'; MAX_LINE * 2 + 10], 1);
        let raw = std::fs::read_to_string(&path).unwrap();
        assert_eq!(raw.matches(" stdout P ").count(), 2);
        log.flush(2);
        let e = read_all(&path, DEFAULT_MAX_FILES);
        assert_eq!(text(&e, LogStream::Stdout).len(), MAX_LINE * 2 + 11);
    }

    #[test]
    fn the_log_is_rotated_at_its_bound_and_keeps_its_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut log = LogFile::new(path.clone(), 4096, 3);
        for i in 0..1000 {
            log.write(LogStream::Stdout, format!("line {i:04}\n").as_bytes(), 0);
        }
        let kept = files(&path, 3);
        assert_eq!(kept.len(), 3, "{kept:?}");
        for f in &kept {
            assert!(std::fs::metadata(f).unwrap().len() <= 4096);
        }
        assert!(!numbered(&path, 3).exists());
        let e = read_all(&path, 3);
        let out = text(&e, LogStream::Stdout);
        assert!(out.ends_with("line 0999\n"));
        let first: usize = out[5..9].parse().unwrap();
        let lines = out.lines().count();
        assert_eq!(first + lines, 1000, "what is kept is the newest, in order");
    }

    #[test]
    fn dropped_output_is_noted_where_it_was_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut log = LogFile::new(path.clone(), DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES);
        log.note_dropped(
            Dropped {
                stdout: 10,
                stderr: 0,
            },
            0,
        );
        let e = read_all(&path, 1);
        assert_eq!(
            text(&e, LogStream::Stdout),
            "[runv: 10 bytes of stdout dropped in the guest]\n"
        );
    }
}
