//! Commands left running in the guest: [`VmHandle::spawn`] returns a [`Process`] to write
//! its stdin, read its output as it comes, signal it, resize its terminal and wait for it.

use loft_agent::client::Process;
use loft_agent::ExecRequest;

use super::VmHandle;
use crate::Error;

impl VmHandle {
    /// Starts `cmd` in the guest and returns once it runs (or with the reason it could not
    /// start: [`Error::Agent`] holding [`AgentError::Remote`](crate::error::AgentError), whose
    /// `is_not_found()` says the program is missing). Its stdin is fed by
    /// [`Process::write_stdin`] and closed by [`Process::close_stdin`]; with
    /// [`ExecRequest::pty`] it runs on a terminal. Dropping the `Process` kills the command,
    /// unless it was started with [`ExecRequest::detach`]. Many may run at once.
    /// [`ExecRequest::timeout`] does not apply: use [`Process::wait_timeout`].
    pub fn spawn(&self, cmd: &ExecRequest) -> Result<Process, Error> {
        let stream = self.agent_stream()?;
        Ok(Process::start(stream, cmd, Some(self.agent_timeout))?)
    }
}
