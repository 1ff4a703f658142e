//! What fleet mode costs per decision: a transport admission decided by the local
//! governor limiter versus one decided by the shared GCRA in a real `redis-server`
//! on loopback (one `EVALSHA` round trip), as p50/p99 latency; then decisions per
//! second with many admissions in flight and the Redis CPU each one costs, which is
//! what bounds how large a fleet one Redis carries.
//!
//! `cargo bench --bench fleet` (needs `/usr/bin/redis-server`; prints, asserts nothing).

use mxpace::classify::Classifier;
use mxpace::config::Config;
use mxpace::shaping::{Admission, Engine, EngineClock};
use mxpace::store::fleet::Fleet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// Destinations the decisions are spread over (site × identity).
const DESTINATIONS: usize = 1000;
const SEQUENTIAL: usize = 20_000;

struct Redis(Child, u16);

impl Redis {
    fn start() -> Redis {
        assert!(
            std::path::Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} missing: run integration/install-deps.sh"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Redis(child, port);
        for _ in 0..500 {
            if r.command("PING").starts_with("+PONG") {
                return r;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    /// One inline command; the raw reply.
    fn command(&self, cmd: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.1)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_millis(500))).ok();
        let _ = s.write_all(format!("{cmd}\r\n").as_bytes());
        let mut buf = vec![0u8; 16384];
        let mut n = 0;
        // Bulk replies: read until the announced length has arrived or the read times out.
        while let Ok(k) = s.read(&mut buf[n..]) {
            if k == 0 {
                break;
            }
            n += k;
            let text = String::from_utf8_lossy(&buf[..n]);
            if !text.starts_with('$') || text.ends_with("\r\n") && text.matches("\r\n").count() >= 2
            {
                break;
            }
        }
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Seconds of CPU the server has used (user + system).
    fn cpu_seconds(&self) -> f64 {
        let info = self.command("INFO cpu");
        ["used_cpu_sys:", "used_cpu_user:"]
            .iter()
            .filter_map(|k| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .sum()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let (p50, p99, p999) = (
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        percentile(&v, 0.999),
    );
    println!(
        "{name:<28} n={:<6} p50 {:>8.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs",
        v.len(),
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        p999.as_secs_f64() * 1e6
    );
    (p50, p99)
}

fn main() {
    // `cargo bench` passes --bench; any other run (cargo test --benches) only checks it builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let redis = Redis::start();
    let toml = format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{}/\"\nredis_timeout = \"50ms\"\n[providers.gmail]\ndomains = [\"gmail.test\"]\nstart_tier = \"t9\"\nmax_tier = \"t9\"\n",
        redis.1
    );
    let config = Arc::new(Config::from_toml(&toml, "bench").unwrap());
    let engine = Arc::new(Engine::new(
        config.clone(),
        Arc::new(Classifier::builtin()),
        EngineClock::real(),
    ));
    let pools: Vec<String> = (0..DESTINATIONS).map(|i| format!("pool{i}")).collect();
    // One core for this process, the other for Redis.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fleet = Fleet::start(&config, &engine).unwrap();
        fleet.wait_joined().await;
        assert!(fleet.is_up(), "fleet did not join Redis");
        println!(
            "one decision = transport admission of a recipient at gmail (t9: 100/s, burst 100), {DESTINATIONS} destinations"
        );

        let mut local = Vec::with_capacity(SEQUENTIAL);
        let mut routed = 0;
        for i in 0..SEQUENTIAL {
            let pool = &pools[i % DESTINATIONS];
            let t = Instant::now();
            let a = engine.admit("u@gmail.test", Some(pool));
            local.push(t.elapsed());
            routed += matches!(a, Admission::Route { .. }) as usize;
        }
        let (l50, l99) = summary("local (governor)", local);

        let mut shared = Vec::with_capacity(SEQUENTIAL);
        for i in 0..SEQUENTIAL {
            let pool = &pools[i % DESTINATIONS];
            let t = Instant::now();
            let a = match engine.plan_admission("u@gmail.test", Some(pool)) {
                Ok(plan) => fleet.admit(&engine, &plan).await,
                Err(a) => a,
            };
            shared.push(t.elapsed());
            routed += matches!(a, Admission::Route { .. }) as usize;
        }
        let (f50, f99) = summary("fleet (Redis GCRA)", shared);
        assert!(fleet.is_up(), "Redis dropped out during the run");
        println!(
            "added by the round trip      p50 {:>8.1} µs  p99 {:>8.1} µs   ({routed} routed of {})",
            (f50.saturating_sub(l50)).as_secs_f64() * 1e6,
            (f99.saturating_sub(l99)).as_secs_f64() * 1e6,
            2 * SEQUENTIAL
        );

        println!("\nin flight  decisions/s in Redis  local (outage)  Redis CPU per decision  one Redis core carries");
        for in_flight in [1usize, 8, 32, 128] {
            // A row after an outage starts once the instance has rejoined.
            for _ in 0..100 {
                if fleet.is_up() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let cpu0 = redis.cpu_seconds();
            let t0 = Instant::now();
            let run = Duration::from_secs(3);
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..in_flight {
                let (engine, fleet, pools) = (engine.clone(), fleet.clone(), pools.clone());
                tasks.spawn(async move {
                    let (mut shared, mut local) = (0u64, 0u64);
                    let mut i = w;
                    while t0.elapsed() < run {
                        let pool = &pools[i % DESTINATIONS];
                        i += in_flight;
                        if let Ok(plan) = engine.plan_admission("u@gmail.test", Some(pool)) {
                            match fleet.take_token(&plan).await {
                                Some(_) => shared += 1,
                                None => {
                                    engine.admit_local(&plan, plan.floor_tier);
                                    local += 1;
                                }
                            }
                        }
                    }
                    (shared, local)
                });
            }
            let (mut shared, mut local) = (0, 0);
            while let Some(r) = tasks.join_next().await {
                let (s, l) = r.unwrap();
                shared += s;
                local += l;
            }
            let secs = t0.elapsed().as_secs_f64();
            let per = (redis.cpu_seconds() - cpu0) / shared.max(1) as f64;
            println!(
                "{in_flight:>9}  {:>20.0}  {local:>14}  {:>19.1} µs  {:>14.0} /s",
                shared as f64 / secs,
                per * 1e6,
                1.0 / per
            );
        }
        fleet.close().await;
    });
}
