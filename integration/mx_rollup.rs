//! MX rollup against a real DNS server (dnsmasq on loopback): unlisted domains hosted by
//! a configured provider join its site, and domains sharing an MX host share one site.
//! Lookups never wait for DNS: the first request for a domain is answered at once.

mod common;

use common::{free_port, Daemon, TempDir};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Dns(Child);

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_dns(port: u16) -> Dns {
    let bin = "/usr/sbin/dnsmasq";
    assert!(
        std::path::Path::new(bin).exists(),
        "dnsmasq is missing: run integration/install-deps.sh (Debian package dnsmasq-base)"
    );
    let child = Command::new(bin)
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            &format!("--port={port}"),
            "--mx-host=workspace.example,aspmx.l.google.com,1",
            "--mx-host=hosted1.example,mx1.hosting.example,10",
            "--mx-host=hosted2.example,mx1.hosting.example,10",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dnsmasq");
    std::thread::sleep(Duration::from_millis(300));
    Dns(child)
}

fn socketmap(addr: &str, map: &str, key: &str) -> String {
    let payload = format!("{map} {key}");
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("{}:{payload},", payload.len()).as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let (_, rest) = text.split_once(':').unwrap();
    rest.trim_end_matches(',').to_string()
}

/// Repeats `f` until it returns true (the background lookup has landed) or 5 s pass.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn unlisted_domains_roll_up_by_mx() {
    let port = free_port();
    let _dns = start_dns(port);
    let dir = TempDir::new("mx");
    let config = format!(
        "[shaping]\nmx_rollup = true\nmx_nameservers = [\"127.0.0.1:{port}\"]\n[providers.gmail]\nmx = [\"*.google.com\"]\nnexthop = \"[127.0.0.1]:2525\"\n"
    );
    let d = Daemon::start_in(&dir.0, &config, &[]).unwrap();

    // A Google-hosted custom domain: the first lookup is not delayed by DNS...
    let started = Instant::now();
    let first = socketmap(&d.addr, "transport", "u@workspace.example");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a transport lookup waited for DNS"
    );
    assert_eq!(first, "NOTFOUND ");
    // ...and once the MX is known, the domain is shaped as part of the gmail site.
    assert!(
        eventually(
            || socketmap(&d.addr, "transport", "u@workspace.example").starts_with("OK mxp_gmail_")
        ),
        "workspace.example never joined the gmail site"
    );

    // Two domains on the same MX host share one site: trouble at one shapes the other.
    socketmap(&d.addr, "transport", "a@hosted1.example");
    socketmap(&d.addr, "transport", "b@hosted2.example");
    std::thread::sleep(Duration::from_millis(500));
    let throttle = "421 4.7.0 Temporary deferral due to volume";
    for i in 0..4 {
        let r = d.policy(&[
            ("request", "delivery_report"),
            ("recipient", &format!("a{i}@hosted1.example")),
            ("reply", throttle),
        ]);
        assert!(r.contains("class=rate_limited"), "{r}");
    }
    let views = d.ctl(&["--json", "status"]).1;
    assert!(
        views.contains("mx:mx1.hosting.example"),
        "no MX group site: {views}"
    );
    let shaped = socketmap(&d.addr, "transport", "b@hosted2.example");
    assert!(
        shaped.starts_with("OK mxp_t") || shaped.starts_with("OK retry:"),
        "hosted2 not shaped with hosted1: {shaped}"
    );
}
