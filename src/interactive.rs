//! `loft run -i`, `-t`, `-it`: the command in the guest with loft's stdin as its input and, with
//! `-t`, on a terminal in the guest, the user's terminal in raw mode meanwhile (as `docker run
//! -it` does).
//!
//! One thread does it all: it polls loft's stdin and the agent connection, sends what the user
//! types as the command's stdin, writes the command's output to loft's stdout and stderr, and
//! passes on terminal size changes (`SIGWINCH`). The raw mode is undone by a guard on every way
//! out (the command ends, the VM stops, an error, a signal that stops the VM, a panic).

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use loft::error::AgentError;
use loft::{ExecRequest, ExitStatus, ProcessOutput, VmHandle};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::terminal::RawTerminal;

/// Set by `SIGWINCH`: the user's terminal changed size.
static RESIZED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    RESIZED.store(true, Ordering::Release);
}

/// Installs the `SIGWINCH` handler (before the thread is confined: it needs `rt_sigaction`).
pub fn install_resize_handler() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    if let Err(e) = unsafe { signal(Signal::SIGWINCH, SigHandler::Handler(on_winch)) } {
        log::warn!("cannot handle SIGWINCH: {e}");
    }
}

/// The size of the terminal on stdout (or stdin), if either is one.
fn window_size() -> Option<(u16, u16)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which points to a live one.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// Runs `argv` in the guest: with `stdin`, loft's stdin is its input (its end closes the
/// command's stdin); with `tty`, on a terminal in the guest of the user's terminal's size (24×80
/// when there is none), with `TERM` passed on.
pub fn run(
    vm: &VmHandle,
    argv: Vec<String>,
    stdin: bool,
    tty: bool,
) -> Result<ExitStatus, loft::Error> {
    let mut req = ExecRequest::new(argv);
    if tty {
        let (rows, cols) = window_size().unwrap_or((24, 80));
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        req = req.pty(rows, cols).env("TERM", term);
    }
    let mut process = vm.spawn(&req)?;
    // Raw only once the command runs: until then ^C still stops loft the usual way.
    let _raw = match tty {
        true => RawTerminal::enable_on_stdin().map_err(|source| loft::Error::Host {
            what: "put the terminal in raw mode",
            source,
        })?,
        false => None,
    };
    let (mut out, mut err) = (io::stdout().lock(), io::stderr().lock());
    let mut stdin_open = stdin;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Everything that has arrived, then wait for more (or for input).
        loop {
            match process.read_output(Some(Duration::from_millis(1))) {
                Ok(Some(ProcessOutput::Stdout(d))) => {
                    let _ = out.write_all(&d).and_then(|()| out.flush());
                }
                Ok(Some(ProcessOutput::Stderr(d))) => {
                    let _ = err.write_all(&d).and_then(|()| err.flush());
                }
                Ok(None) => {
                    return process
                        .status()
                        .ok_or(loft::Error::Agent(AgentError::NoExitStatus))
                }
                Err(AgentError::Timeout) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if tty && RESIZED.swap(false, Ordering::AcqRel) {
            if let Some((rows, cols)) = window_size() {
                process.resize(rows, cols)?;
            }
        }
        let user_in = io::stdin();
        let mut fds = vec![PollFd::new(process.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(user_in.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(loft::Error::Host {
                    what: "wait for input",
                    source: e.into(),
                })
            }
        }
        let ready = stdin_open
            && fds[1]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP));
        drop(fds);
        if ready {
            match nix::unistd::read(user_in.as_fd(), &mut buf) {
                Ok(0) => {
                    stdin_open = false;
                    process.close_stdin()?;
                }
                Ok(n) => process.write_stdin(&buf[..n])?,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => {
                    // An unreadable stdin ends the input, not the command.
                    log::warn!("cannot read stdin: {e}");
                    stdin_open = false;
                    process.close_stdin()?;
                }
            }
        }
    }
}
