//! Shared by the integration tests: start the real `mxpace` binary on free loopback
//! ports with its own config and state file, talk to it, stop it by PID.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub metrics: String,
    pub admin: String,
    pub dir: std::path::PathBuf,
    /// The directory this daemon created for itself (removed with it).
    owned: Option<TempDir>,
    /// Already stopped (killed or exited): never signal a PID that may be reused.
    stopped: bool,
}

pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "mxpace-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    /// Starts a daemon with `config` (TOML text) and a state file in a fresh directory.
    pub fn start(config: &str) -> Daemon {
        let dir = TempDir::new("daemon");
        let mut d = Daemon::start_in(&dir.0, config, &[]).expect("daemon starts");
        d.owned = Some(dir);
        d
    }

    /// Starts a daemon in `dir` (config, state file `state.db` there) with extra arguments.
    /// Err(stderr) when it exits before announcing its listener.
    pub fn start_in(dir: &std::path::Path, config: &str, extra: &[&str]) -> Result<Daemon, String> {
        let cfg = dir.join("mxpace.toml");
        std::fs::write(&cfg, config).unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_mxpace"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                &metrics,
                "--admin-listen",
                &admin,
            ])
            .arg("--state")
            .arg(dir.join("state.db"))
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mxpace");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on ") {
                    let addr = line[i + 13..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(Ok(addr));
                } else {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut log = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(addr)) => {
                    return Ok(Daemon {
                        child,
                        addr,
                        metrics,
                        admin,
                        dir: dir.to_path_buf(),
                        owned: None,
                        stopped: false,
                    })
                }
                Ok(Err(line)) => {
                    log.push_str(&line);
                    log.push('\n');
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(log);
                }
            }
        }
    }

    /// `mxpace ctl --admin … ARGS`; (exit success, stdout + stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mxpace"))
            .args(["ctl", "--admin", &self.admin])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stopped = true;
    }

    /// SIGTERM and wait; the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let status = self.child.wait().unwrap();
        self.stopped = true;
        status
    }

    pub fn policy(&self, attrs: &[(&str, &str)]) -> String {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        let mut req = String::new();
        for (k, v) in attrs {
            req.push_str(&format!("{k}={v}\n"));
        }
        req.push('\n');
        s.write_all(req.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 || line == "\n" {
                break;
            }
            out.push_str(&line);
        }
        out
    }

    pub fn scrape(&self) -> String {
        let mut s = TcpStream::connect(&self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        let i = body.find("\r\n\r\n").expect("http response");
        assert!(body.starts_with("HTTP/1.1 200"), "{}", &body[..i]);
        body[i + 4..].to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
