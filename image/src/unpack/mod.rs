//! Applying image layers (tar, gzip or zstd) in order into a directory, with
//! OCI whiteouts, as hostile input.
//!
//! The `tar` crate only parses; every write is ours and goes through
//! `safe_fs`: parents are resolved beneath the root without following any
//! symlink, so an entry that would reach outside (`../x`, `/x`, a path through
//! a symlink an earlier entry planted, a hardlink to a name outside) is refused
//! and the layer fails. Unlike containerd, which resolves a symlinked parent
//! inside the root, a layer that writes *through* any symlink is refused:
//! image builders record real paths, and refusing is the smaller surface.
//!
//! Whiteouts follow the OCI image spec: `.wh.NAME` removes `NAME` from lower
//! layers, `.wh..wh..opq` empties its directory of lower-layer entries; neither
//! touches entries of its own layer. Device nodes are created only when
//! [`Limits::allow_devices`] is set. Ownership is applied when running as
//! root; `user.*` and `security.capability` xattrs are kept where the
//! filesystem supports them (others, such as `trusted.*`, are dropped).
//! Decompressed bytes and entries are counted per layer and per image, so a
//! decompression bomb stops with [`UnpackError::TooLarge`].

#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
mod safe_fs;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path};
use std::rc::Rc;

/// Longest entry path accepted (Linux's `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;
/// Deepest directory nesting accepted.
const MAX_DEPTH: usize = 1024;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The root directory cannot be opened.
    #[error("open unpack root {}", .path.display())]
    Root {
        /// The root.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A layer blob cannot be opened from the store.
    #[error("open layer blob {}", .path.display())]
    Blob {
        /// The blob's file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The layer is not a readable tar stream (or its compression is broken).
    #[error("reading layer tar")]
    Tar(#[source] io::Error),
    /// The media type names a compression the bytes do not have.
    #[error("layer of media type {0:?} does not start with that compression's magic bytes")]
    Compression(String),
    /// An entry's path leaves the root (`..` or absolute).
    #[error("entry {0:?} escapes the root")]
    Escape(String),
    /// An entry's path is empty, too long or too deep.
    #[error("entry path {0:?} is empty, longer than 4096 bytes or deeper than 1024")]
    BadPath(String),
    /// A filesystem operation on an entry failed; `ELOOP` here means its path
    /// went through a symlink.
    #[error("{op} {path:?}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The entry's path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A device node while devices are not allowed.
    #[error("device node {0:?} refused")]
    Device(String),
    /// An entry type we do not apply (sparse files, unknown types).
    #[error("entry {path:?} has unsupported tar type {kind}")]
    Unsupported {
        /// The entry's path.
        path: String,
        /// The tar type byte.
        kind: u8,
    },
    /// A uid or gid that is not a valid id.
    #[error("entry {0:?} has an out-of-range uid or gid")]
    BadOwner(String),
    /// More uncompressed bytes than allowed.
    #[error("layer exceeds the limit of {0} uncompressed bytes")]
    TooLarge(u64),
    /// More entries than allowed.
    #[error("image exceeds the limit of {0} tar entries")]
    TooManyEntries(u64),
}

type Result<T, E = UnpackError> = std::result::Result<T, E>;

/// What an image may cost to unpack.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Uncompressed bytes of one layer's tar stream.
    pub max_layer_bytes: u64,
    /// Uncompressed bytes of all layers together.
    pub max_image_bytes: u64,
    /// Tar entries of all layers together.
    pub max_entries: u64,
    /// Whether character and block device nodes may be created.
    pub allow_devices: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_layer_bytes: 16 << 30,
            max_image_bytes: 32 << 30,
            max_entries: 1_000_000,
            allow_devices: false,
        }
    }
}

/// Applies layers, in order, into one root directory.
#[derive(Debug)]
pub struct Applier {
    root: OwnedFd,
    limits: Limits,
    as_root: bool,
    image_bytes: u64,
    entries: u64,
}

/// Applies an image's layers from `store`, bottom first, into `root` (an
/// existing, normally empty, directory).
pub fn unpack_image(
    store: &crate::store::BlobStore,
    layers: &[crate::pull::Layer],
    root: &Path,
    limits: Limits,
) -> Result<()> {
    let mut applier = Applier::new(root, limits)?;
    for layer in layers {
        let path = store.path(&layer.digest);
        let blob =
            std::fs::File::open(&path).map_err(|source| UnpackError::Blob { path, source })?;
        applier.apply(blob, &layer.media_type)?;
    }
    Ok(())
}

/// A directory whose mode and mtime are set once its layer is done (so a
/// read-only directory can still be filled, and its mtime is final).
struct DeferredDir {
    components: Vec<OsString>,
    mode: u32,
    mtime: u64,
}

/// The state of one layer being applied.
struct LayerState {
    written: HashSet<Vec<u8>>,
    dirs: Vec<DeferredDir>,
}

impl Applier {
    /// An applier writing beneath `root`, an existing directory.
    pub fn new(root: &Path, limits: Limits) -> Result<Self> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let root_fd =
            rustix::fs::open(root, flags, Mode::empty()).map_err(|e| UnpackError::Root {
                path: root.to_owned(),
                source: e.into(),
            })?;
        Ok(Self {
            root: root_fd,
            limits,
            as_root: rustix::process::geteuid().is_root(),
            image_bytes: 0,
            entries: 0,
        })
    }

    /// Applies one layer blob of `media_type`.
    pub fn apply(&mut self, blob: impl Read, media_type: &str) -> Result<()> {
        let remaining = (self.limits.max_image_bytes.saturating_sub(self.image_bytes))
            .min(self.limits.max_layer_bytes);
        let tripped = Rc::new(Cell::new(false));
        let counted = Rc::new(Cell::new(0u64));
        let limited = Limited {
            inner: decompress(blob, media_type)?,
            remaining,
            tripped: tripped.clone(),
            counted: counted.clone(),
        };
        let result = self.apply_tar(limited);
        self.image_bytes += counted.get();
        match result {
            Err(_) if tripped.get() => Err(UnpackError::TooLarge(remaining)),
            other => other,
        }
    }

    fn apply_tar(&mut self, stream: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(stream);
        let mut state = LayerState {
            written: HashSet::new(),
            dirs: Vec::new(),
        };
        for entry in archive.entries().map_err(UnpackError::Tar)? {
            let mut entry = entry.map_err(UnpackError::Tar)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(UnpackError::TooManyEntries(self.limits.max_entries));
            }
            self.apply_entry(&mut entry, &mut state)?;
        }
        // Deepest first, so setting a parent's mtime comes after its children.
        state
            .dirs
            .sort_by_key(|d| std::cmp::Reverse(d.components.len()));
        for dir in &state.dirs {
            self.finish_dir(dir)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        state: &mut LayerState,
    ) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            return Ok(());
        }
        let components = split_path(&raw_path)?;
        let Some((name, parents)) = components.split_last() else {
            return Ok(()); // the root itself: its metadata is ours
        };
        if let Some(hidden) = name.as_bytes().strip_prefix(b".wh.") {
            let parent = match safe_fs::open_dir(&self.root, parents, false) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                other => other.map_err(io_err(&shown, "open parent of whiteout"))?,
            };
            return self
                .whiteout(&parent, parents, hidden, state)
                .map_err(io_err(&shown, "apply whiteout"));
        }
        let parent = safe_fs::open_dir(&self.root, parents, true)
            .map_err(io_err(&shown, "open parent directory"))?;
        for depth in 1..=components.len() {
            state.written.insert(raw_key(&components[..depth]));
        }
        let meta = Meta::of(entry, &shown)?;
        match kind {
            tar::EntryType::Directory => {
                self.make_dir(&parent, name, &meta)
                    .map_err(io_err(&shown, "create directory"))?;
                state.dirs.push(DeferredDir {
                    components: components.clone(),
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
                Ok(())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => self
                .make_file(&parent, name, &meta, entry)
                .map_err(io_err(&shown, "write file")),
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.make_symlink(&parent, name, &meta, &target)
                    .map_err(io_err(&shown, "create symlink"))
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target = split_path(&target)?;
                self.make_hardlink(&parent, name, &target)
                    .map_err(io_err(&shown, "create hardlink"))
            }
            tar::EntryType::Char | tar::EntryType::Block if !self.limits.allow_devices => {
                Err(UnpackError::Device(shown.clone()))
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                self.make_node(&parent, name, &meta, ft, rustix::fs::makedev(major, minor))
                    .map_err(io_err(&shown, "create node"))
            }
            other => Err(UnpackError::Unsupported {
                path: shown.clone(),
                kind: other.as_byte(),
            }),
        }
    }

    /// `.wh.NAME` removes NAME; `.wh..wh..opq` empties the directory. Only
    /// lower layers' entries are affected.
    fn whiteout(
        &self,
        parent: &OwnedFd,
        parents: &[OsString],
        hidden: &[u8],
        state: &LayerState,
    ) -> io::Result<()> {
        let mut key = raw_key(parents);
        if hidden == b".wh..opq" {
            let listing = safe_fs::open_dir_rw(parent, OsStr::new("."))?;
            for child in safe_fs::children(&listing)? {
                let child_key = join_key(&key, child.as_bytes());
                if !state.written.contains(&child_key) {
                    safe_fs::remove_all(parent, &child, MAX_DEPTH)?;
                }
            }
            return Ok(());
        }
        let name = OsStr::from_bytes(hidden);
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(io::Error::other("whiteout of an invalid name"));
        }
        key = join_key(&key, hidden);
        if state.written.contains(&key) {
            return Ok(());
        }
        safe_fs::remove_all(parent, name, MAX_DEPTH)
    }

    /// Removes whatever is at `name` unless it is a directory and `keep_dir`.
    fn clear(&self, parent: &OwnedFd, name: &OsStr, keep_dir: bool) -> io::Result<bool> {
        match safe_fs::file_type(parent, name)? {
            Some(FileType::Directory) if keep_dir => Ok(true),
            Some(_) => safe_fs::remove_all(parent, name, MAX_DEPTH).map(|()| false),
            None => Ok(false),
        }
    }

    fn make_dir(&self, parent: &OwnedFd, name: &OsStr, meta: &Meta) -> io::Result<()> {
        if !self.clear(parent, name, true)? {
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))?;
        }
        let dir = safe_fs::open_dir_rw(parent, name)?;
        self.chown(&dir, meta)?;
        apply_xattrs(&dir, &meta.xattrs)
    }

    fn make_file(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        data: &mut impl Read,
    ) -> io::Result<()> {
        self.clear(parent, name, false)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(parent, name, flags, Mode::from_raw_mode(0o600))?;
        let mut file = std::fs::File::from(fd);
        io::copy(data, &mut file)?;
        self.chown(&file, meta)?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode))?;
        apply_xattrs(&file, &meta.xattrs)?;
        rustix::fs::futimens(&file, &times(meta.mtime))?;
        Ok(())
    }

    fn make_symlink(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        target: &[u8],
    ) -> io::Result<()> {
        self.clear(parent, name, false)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), parent, name)?;
        if self.as_root {
            rustix::fs::chownat(
                parent,
                name,
                Some(meta.uid),
                Some(meta.gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        rustix::fs::utimensat(parent, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    fn make_hardlink(&self, parent: &OwnedFd, name: &OsStr, target: &[OsString]) -> io::Result<()> {
        let (target_name, target_parents) = target
            .split_last()
            .ok_or_else(|| io::Error::other("hardlink to the root"))?;
        let target_dir = safe_fs::open_dir(&self.root, target_parents, false)?;
        if safe_fs::file_type(&target_dir, target_name)? == Some(FileType::Directory) {
            return Err(io::Error::other("hardlink to a directory"));
        }
        self.clear(parent, name, false)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        rustix::fs::linkat(&target_dir, target_name, parent, name, AtFlags::empty())?;
        Ok(())
    }

    fn make_node(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        ft: FileType,
        dev: u64,
    ) -> io::Result<()> {
        self.clear(parent, name, false)?;
        rustix::fs::mknodat(parent, name, ft, Mode::from_raw_mode(meta.mode), dev)?;
        if self.as_root {
            rustix::fs::chownat(
                parent,
                name,
                Some(meta.uid),
                Some(meta.gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        // mknod applies the umask; set the mode exactly.
        rustix::fs::chmodat(
            parent,
            name,
            Mode::from_raw_mode(meta.mode),
            AtFlags::empty(),
        )?;
        rustix::fs::utimensat(parent, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    fn chown(&self, fd: impl AsFd, meta: &Meta) -> io::Result<()> {
        if self.as_root {
            rustix::fs::fchown(fd, Some(meta.uid), Some(meta.gid))?;
        }
        Ok(())
    }

    fn finish_dir(&self, dir: &DeferredDir) -> Result<()> {
        let io = |source: io::Error| UnpackError::Io {
            op: "set directory mode",
            path: String::from_utf8_lossy(&raw_key(&dir.components)).into_owned(),
            source,
        };
        let Some((name, parents)) = dir.components.split_last() else {
            return Ok(());
        };
        let parent = match safe_fs::open_dir(&self.root, parents, false) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            other => other.map_err(io)?,
        };
        match safe_fs::file_type(&parent, name).map_err(io)? {
            Some(FileType::Directory) => {}
            _ => return Ok(()), // removed or replaced later in the layer
        }
        let fd = safe_fs::open_dir_rw(&parent, name).map_err(io)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(dir.mode)).map_err(|e| io(e.into()))?;
        rustix::fs::futimens(&fd, &times(dir.mtime)).map_err(|e| io(e.into()))
    }
}

fn io_err<'a>(path: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Ownership, mode, mtime and kept xattrs of an entry.
struct Meta {
    uid: rustix::fs::Uid,
    gid: rustix::fs::Gid,
    mode: u32,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<R>, shown: &str) -> Result<Self> {
        let pax = pax_of(entry)?;
        let h = entry.header();
        // A PAX uid/gid (ids past the header's octal range) wins; an all-NUL
        // or blank header field is 0, as Go's archive/tar (Docker,
        // containerd) reads it.
        let blank = |raw: &[u8]| raw.iter().all(|b| *b == 0 || *b == b' ');
        let old = h.as_old();
        let id = |pax: Option<u64>, v: io::Result<u64>, raw: &[u8]| {
            pax.or(v.ok())
                .or(blank(raw).then_some(0))
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| UnpackError::BadOwner(shown.to_owned()))
        };
        let uid = id(pax.uid, h.uid(), &old.uid)?;
        let gid = id(pax.gid, h.gid(), &old.gid)?;
        let mode = h.mode().map_err(UnpackError::Tar)? & 0o7777;
        let mtime = h.mtime().unwrap_or(0);
        Ok(Self {
            uid: rustix::fs::Uid::from_raw(uid),
            gid: rustix::fs::Gid::from_raw(gid),
            mode,
            mtime,
            xattrs: pax.xattrs,
        })
    }
}

/// What an entry's PAX records say that we use.
#[derive(Default)]
struct Pax {
    uid: Option<u64>,
    gid: Option<u64>,
    /// The `SCHILY.xattr.*` records we keep.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn pax_of<R: Read>(entry: &mut tar::Entry<R>) -> Result<Pax> {
    let mut pax = Pax::default();
    let Some(exts) = entry.pax_extensions().map_err(UnpackError::Tar)? else {
        return Ok(pax);
    };
    let number = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    for ext in exts {
        let ext = ext.map_err(UnpackError::Tar)?;
        match ext.key_bytes() {
            b"uid" => pax.uid = number(ext.value_bytes()),
            b"gid" => pax.gid = number(ext.value_bytes()),
            key => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.")
                    && (name.starts_with(b"user.") || name == b"security.capability")
                {
                    pax.xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(pax)
}

fn apply_xattrs(fd: impl AsFd, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    for (name, value) in xattrs {
        let set = rustix::fs::fsetxattr(
            fd.as_fd(),
            OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        );
        match set {
            Err(rustix::io::Errno::OPNOTSUPP) => return Ok(()), // the filesystem keeps none
            other => other?,
        }
    }
    Ok(())
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Splits an entry path into normal components; refuses `..`, absolute paths,
/// over-long or over-deep ones. `.` and empty components are dropped.
pub(crate) fn split_path(raw: &[u8]) -> Result<Vec<OsString>> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.len() > MAX_PATH_BYTES || raw.contains(&0) {
        return Err(UnpackError::BadPath(shown()));
    }
    let mut out = Vec::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(UnpackError::Escape(shown()));
            }
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(UnpackError::BadPath(shown()));
    }
    Ok(out)
}

fn raw_key(components: &[OsString]) -> Vec<u8> {
    let mut key = Vec::new();
    for c in components {
        key = join_key(&key, c.as_bytes());
    }
    key
}

fn join_key(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut key = parent.to_vec();
    if !key.is_empty() {
        key.push(b'/');
    }
    key.extend_from_slice(name);
    key
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Wraps the blob in the decompressor its magic bytes name; a media type that
/// names a compression the bytes lack is an error.
fn decompress<'a>(blob: impl Read + 'a, media_type: &str) -> Result<Box<dyn Read + 'a>> {
    let mut blob = BufReader::with_capacity(1 << 16, blob);
    let head = blob.fill_buf().map_err(UnpackError::Tar)?.to_vec();
    let (gzip, zstd) = (head.starts_with(GZIP_MAGIC), head.starts_with(ZSTD_MAGIC));
    let says_gzip = media_type.ends_with("gzip");
    let says_zstd = media_type.ends_with("zstd");
    if (says_gzip && !gzip) || (says_zstd && !zstd) {
        return Err(UnpackError::Compression(media_type.to_owned()));
    }
    Ok(if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(blob))
    } else if zstd {
        Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(UnpackError::Tar)?)
    } else {
        Box::new(blob)
    })
}

/// Counts decompressed bytes and fails the read past the limit.
struct Limited<R> {
    inner: R,
    remaining: u64,
    tripped: Rc<Cell<bool>>,
    counted: Rc<Cell<u64>>,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counted.set(self.counted.get() + n as u64);
        if n as u64 > self.remaining {
            self.tripped.set(true);
            return Err(io::Error::other("uncompressed size limit reached"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
