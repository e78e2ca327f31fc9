//! loft's own endpoints, under `/loft/`: what Firecracker's API has no word for.
//!
//! - `PUT /loft/exec` runs a command in the guest through its agent:
//!   `{"args": ["/bin/sh", "-c", "…"], "env": {"NAME": "value"}, "cwd": "/", "timeout": 10}`
//!   (`env`, `cwd` and `timeout`, in seconds, are optional) and answers
//!   `{"exit_code": 0, "signal": null, "stdout": "…", "stderr": "…"}`; a stream that is not
//!   UTF-8 comes as `stdout_base64` / `stderr_base64` instead.
//! - `GET /loft/boot-times`: when the run's phases happened, wall and CPU milliseconds.
//! - `GET /loft/console`: guest console bytes dropped because loft's output did not keep up.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use loft_agent::client::{ExitStatus, Output};
use loft_agent::ExecRequest;
use serde::Deserialize;

use super::firecracker::json;
use super::server::{Method, Response};
use super::Action;
use crate::boot_timer::{BootTimes, Mark};

/// The body of `PUT /loft/exec`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// The command and its arguments.
    pub args: Vec<String>,
    /// Environment variables added to the agent's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory.
    pub cwd: Option<String>,
    /// Seconds after which the command is killed.
    pub timeout: Option<f64>,
}

impl ExecBody {
    /// The agent request.
    pub fn request(&self) -> ExecRequest {
        let mut r = ExecRequest::new(self.args.clone());
        for (k, v) in &self.env {
            r = r.env(k, v);
        }
        if let Some(cwd) = &self.cwd {
            r = r.cwd(cwd);
        }
        if let Some(t) = self.timeout {
            r = r.timeout(Duration::from_secs_f64(t));
        }
        r
    }
}

/// Parses a request under `/loft/`.
pub fn parse(method: Method, path: &str, body: &[u8]) -> Result<Action, Response> {
    match (method, path.trim_end_matches('/')) {
        (Method::Put, "/loft/exec") => {
            let e: ExecBody = json(method, body)?;
            if e.args.is_empty() {
                return Err(Response::fault(400, "args must name a command."));
            }
            if e.timeout
                .is_some_and(|t| !t.is_finite() || t <= 0.0 || t > 1e9)
            {
                return Err(Response::fault(
                    400,
                    "timeout must be a positive number of seconds.",
                ));
            }
            Ok(Action::Exec(e))
        }
        (Method::Get, "/loft/boot-times") => Ok(Action::BootTimes),
        (Method::Get, "/loft/console") => Ok(Action::Console),
        _ => Err(Response::fault(
            400,
            format!(
                "Invalid request method and/or path: {} {}.",
                method.as_str(),
                path
            ),
        )),
    }
}

/// A stream as text when it is UTF-8, else base64 under `NAME_base64`.
fn stream(out: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            out.insert(name.into(), text.into());
        }
        Err(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            out.insert(format!("{name}_base64"), b64.into());
        }
    }
}

/// The answer to an exec.
pub fn exec_response(output: &Output) -> Response {
    let mut out = serde_json::Map::new();
    let (code, signal) = match output.status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    };
    out.insert("exit_code".into(), code.into());
    out.insert("signal".into(), signal.into());
    stream(&mut out, "stdout", &output.stdout);
    stream(&mut out, "stderr", &output.stderr);
    Response::ok(out.into())
}

/// The answer to `GET /loft/boot-times`.
pub fn boot_times_response(t: &BootTimes) -> Response {
    let mark = |m: Option<Mark>| {
        m.map(|m| {
            serde_json::json!({
                "wall_ms": m.wall.as_secs_f64() * 1e3,
                "cpu_ms": m.cpu.as_secs_f64() * 1e3,
            })
        })
    };
    Response::ok(serde_json::json!({
        "vm_built": mark(t.vm_built),
        "restored": mark(t.restored),
        "first_entry": mark(t.first_entry),
        "kernel_init": mark(t.kernel_init),
        "user_init": mark(t.user_init),
        "stop_request": mark(t.stop_request),
        "exit": mark(t.exit),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_bodies() {
        let a = parse(
            Method::Put,
            "/loft/exec",
            br#"{"args":["/bin/echo","hi"],"env":{"A":"b"},"timeout":2.5}"#,
        )
        .unwrap();
        let Action::Exec(e) = a else { panic!() };
        let r = e.request();
        assert_eq!(r.argv, ["/bin/echo", "hi"]);
        assert_eq!(r.env, [("A".to_string(), "b".to_string())]);
        assert_eq!(r.timeout, Some(Duration::from_millis(2500)));
        for body in [
            r#"{"args":[]}"#,
            r#"{"args":["x"],"timeout":-1}"#,
            r#"{"args":["x"],"shell":true}"#,
            r#"{"args":"x"}"#,
        ] {
            assert_eq!(
                parse(Method::Put, "/loft/exec", body.as_bytes())
                    .unwrap_err()
                    .status,
                400,
                "{body}"
            );
        }
        assert!(matches!(
            parse(Method::Get, "/loft/boot-times", b""),
            Ok(Action::BootTimes)
        ));
        assert_eq!(
            parse(Method::Get, "/loft/nope", b"").unwrap_err().status,
            400
        );
    }

    #[test]
    fn exec_answers_text_or_base64() {
        let r = exec_response(&Output {
            status: ExitStatus::Code(3),
            stdout: b"out\n".to_vec(),
            stderr: vec![0xff, 0xfe],
        });
        let b = r.body.unwrap();
        assert_eq!(b["exit_code"], 3);
        assert!(b["signal"].is_null());
        assert_eq!(b["stdout"], "out\n");
        assert_eq!(b["stderr_base64"], "//4=");
        assert!(b.get("stderr").is_none());
    }
}
