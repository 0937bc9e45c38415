//! Network namespaces by name (`ip netns`), and running a closure on a thread inside one.

use std::fs::File;
use std::path::Path;
use std::process::Command;

/// What went wrong setting up or entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot open namespace {name}: {source}")]
    Open { name: String, source: std::io::Error },
    #[error("cannot enter namespace {name}: {source}")]
    Enter { name: String, source: nix::Error },
    #[error("the thread inside namespace {0} panicked")]
    Thread(String),
}

/// Where `ip netns` keeps its names.
const NETNS_DIR: &str = "/run/netns";

/// Runs `ip args…`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetnsError::Command {
            command: format!("ip {}", args.join(" ")),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            command: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Creates namespace `name` with its loopback up.
pub fn create(name: &str) -> Result<(), NetnsError> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Removes the name; the namespace itself goes when the last process or socket in it does.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    ip(&["netns", "delete", name])
}

/// Deletes the namespaces named `<prefix><pid>-…` whose emulator process `pid` is gone (one
/// killed by SIGKILL cannot clean up after itself).
pub fn delete_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = delete(&name);
        }
    }
}

/// Runs `f` on a new thread that has entered namespace `name`: sockets and devices it opens
/// belong to that namespace for their whole life, whichever thread uses them later.
pub fn in_namespace<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T, NetnsError>>, NetnsError> {
    let file = File::open(Path::new(NETNS_DIR).join(name)).map_err(|source| NetnsError::Open {
        name: name.to_string(),
        source,
    })?;
    let name = name.to_string();
    Ok(std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { name, source })?;
        Ok(f())
    }))
}

/// [`in_namespace`], waiting for the result.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
    in_namespace(name, f)?
        .join()
        .map_err(|_| NetnsError::Thread(name.to_string()))?
}
