//! The terminal mode while `loft run` owns the user's terminal.

use std::io::{self, IsTerminal};
use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Puts a terminal in raw mode and restores its exact previous settings when dropped, so every
/// way out of loft that unwinds leaves the user's terminal as it was.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Raw mode on stdin when stdin is a terminal; `None` when it is a pipe or file.
    pub fn enable_on_stdin() -> io::Result<Option<Self>> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd()).map_err(io::Error::from)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).map_err(io::Error::from)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}
