//! Pseudo-terminals for commands run with a terminal (`ExecRequest::pty`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use crate::guest::check;
use crate::WindowSize;

/// A terminal pair: the agent keeps `master`, the command gets `slave` as stdin, stdout and
/// stderr.
#[derive(Debug)]
pub struct Pty {
    /// The agent's end: the command's output is read from it, input written to it.
    pub master: File,
    /// The command's end.
    pub slave: File,
}

/// Opens a new terminal pair of `size` (mounting `devpts` on `/dev/pts` first if nothing is
/// there, as in the bundled guest, whose init mounts only what every boot needs).
pub fn open(size: WindowSize) -> io::Result<Pty> {
    ensure_devpts()?;
    // SAFETY: posix_openpt takes flags and returns a new descriptor (or -1), owned below.
    let fd = check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: fd is a new, valid descriptor nothing else owns.
    let master = unsafe { File::from_raw_fd(fd) };
    // SAFETY: plain calls on the valid master descriptor.
    check(unsafe { libc::grantpt(fd) })?;
    // SAFETY: as above.
    check(unsafe { libc::unlockpt(fd) })?;
    // The slave through the master (TIOCGPTPEER, Linux 4.13): no path lookup, no race.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags by value and returns a new descriptor.
    let sfd = check(unsafe { libc::ioctl(fd, libc::TIOCGPTPEER, flags) })?;
    // SAFETY: sfd is a new, valid descriptor nothing else owns.
    let slave = unsafe { File::from_raw_fd(sfd) };
    set_size(&master, size)?;
    Ok(Pty { master, slave })
}

/// Sets the terminal's size (the kernel sends `SIGWINCH` to its foreground process group).
pub fn set_size(master: &File, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points to a live one.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

fn ensure_devpts() -> io::Result<()> {
    if Path::new("/dev/pts/ptmx").exists() {
        return Ok(());
    }
    std::fs::create_dir_all("/dev/pts")?;
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (src, target, fstype) = (c("devpts")?, c("/dev/pts")?, c("devpts")?);
    let opts = c("gid=5,mode=620,ptmxmode=666")?;
    // SAFETY: every pointer is a live NUL-terminated string for the duration of the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            opts.as_ptr().cast(),
        )
    };
    match check(r) {
        // Another connection mounted it meanwhile.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        r => r.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_pair_carries_bytes_and_has_its_size() {
        let mut pty = open(WindowSize {
            rows: 33,
            cols: 101,
        })
        .unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize to a live one.
        unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
        pty.slave.write_all(b"hi\n").unwrap();
        let mut buf = [0u8; 16];
        let n = pty.master.read(&mut buf).unwrap();
        // The line discipline turns \n into \r\n.
        assert_eq!(&buf[..n], b"hi\r\n");
    }
}
