//! A raw packet socket for test frames on a tap or bridge. Shared by the VMM's
//! device tests and the node agent's NAT test (which includes this file by
//! path), so it depends on `libc` only.

/// A raw packet socket for ethertype [`ETHERTYPE`] on an interface of the
/// calling thread's network namespace.
pub struct PacketSocket {
    fd: i32,
    ifindex: i32,
}

/// The test frames' ethertype (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;

impl PacketSocket {
    pub fn open(ifname: &str) -> Self {
        let c = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `c` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: plain socket(2) call; the fd is owned by the returned value.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETHERTYPE.to_be()),
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ETHERTYPE.to_be();
        sa.sll_ifindex = ifindex;
        // SAFETY: `sa` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Self { fd, ifindex }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sa` are valid for the lengths passed.
        unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
    }

    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and not used after this.
        unsafe { libc::close(self.fd) };
    }
}
