//! Binding listeners: loopback TCP and Unix sockets with the mode and owner Postfix needs.

use crate::config::{parse_listen_address, ListenAddress, ListenerConfig, ListenerProtocol};
use anyhow::{bail, Context};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::net::{TcpListener, UnixListener};

pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

pub struct BoundListener {
    pub listener: Bound,
    pub protocol: ListenerProtocol,
    /// The address actually bound (port 0 resolved).
    pub local: String,
}

/// Resolves a user or group name through the local account files (names or numbers).
fn lookup_id(file: &str, name: &str) -> anyhow::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    for line in text.lines() {
        let mut f = line.split(':');
        if f.next() == Some(name) {
            if let Some(id) = f.nth(1).and_then(|s| s.parse().ok()) {
                return Ok(id);
            }
        }
    }
    bail!("no such name {name:?} in {file}")
}

pub async fn bind(cfg: &ListenerConfig) -> anyhow::Result<BoundListener> {
    let addr = parse_listen_address(&cfg.address).map_err(anyhow::Error::msg)?;
    match addr {
        ListenAddress::Tcp(a) => {
            let l = TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))?;
            let local = l.local_addr()?.to_string();
            Ok(BoundListener {
                listener: Bound::Tcp(l),
                protocol: cfg.protocol,
                local,
            })
        }
        ListenAddress::Unix(path) => {
            remove_stale_socket(&path)?;
            let l = UnixListener::bind(&path)
                .with_context(|| format!("binding unix:{}", path.display()))?;
            if let Some(mode) = &cfg.mode {
                let bits = u32::from_str_radix(mode, 8).context("socket mode")?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bits))
                    .with_context(|| format!("chmod {mode} {}", path.display()))?;
            }
            if cfg.owner.is_some() || cfg.group.is_some() {
                let uid = cfg
                    .owner
                    .as_deref()
                    .map(|o| lookup_id("/etc/passwd", o))
                    .transpose()?;
                let gid = cfg
                    .group
                    .as_deref()
                    .map(|g| lookup_id("/etc/group", g))
                    .transpose()?;
                std::os::unix::fs::chown(&path, uid, gid)
                    .with_context(|| format!("chown {}", path.display()))?;
            }
            Ok(BoundListener {
                listener: Bound::Unix(l, path.clone()),
                protocol: cfg.protocol,
                local: format!("unix:{}", path.display()),
            })
        }
    }
}

/// A socket file left by a killed daemon is removed; any other file is an error.
pub(crate) fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use by a running process", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}
