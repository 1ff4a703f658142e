//! State that survives restarts: suppressions, suspensions and adaptive destination state.
//!
//! The embedded backend is one SQLite file (WAL, `synchronous=FULL`). A writer thread
//! owns the connection and commits changes in batches (group commit): the hot path only
//! sends a message. A request whose answer promises state — a suppression or a
//! suspension — awaits [`Store::sync`], which resolves once everything sent before it is
//! committed, so an acknowledged promise survives `kill -9`. Adaptive counters are
//! flushed every `flush_interval` and may lose at most that much.
//!
//! The fleet backend ([`fleet`]) shares the same state, and each destination's rate,
//! through Redis.

pub mod fleet;

use crate::classify::Class;
use crate::config::Config;
use crate::shaping::engine::{Change, DestRecord};
use crate::shaping::suppress::Suppression;
use crate::shaping::Engine;
use anyhow::{bail, Context};
use rusqlite::{params, Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::oneshot;

enum Msg {
    Dests(Vec<DestRecord>),
    Barrier(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// Handle to the state store; cheap to clone.
#[derive(Clone, Default)]
pub struct Store {
    tx: Option<mpsc::Sender<Msg>>,
    /// Fleet mode: the shared Redis instead of the embedded file.
    fleet: Option<Arc<fleet::Fleet>>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suppressions (
    address TEXT PRIMARY KEY,
    since   INTEGER NOT NULL,
    class   TEXT NOT NULL,
    reply   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS destinations (
    site     TEXT NOT NULL,
    identity TEXT NOT NULL,
    state    TEXT NOT NULL,
    updated  INTEGER NOT NULL,
    PRIMARY KEY (site, identity)
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1');
";

/// Opens (or creates) the state file and checks that it is a healthy mxpace store.
pub fn open_db(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        bail!("integrity check failed: {check}");
    }
    conn.execute_batch(SCHEMA)?;
    let schema: String =
        conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })?;
    if schema != "1" {
        bail!("unknown schema version {schema}");
    }
    Ok(conn)
}

/// Everything a store file holds: destinations and suppressions.
pub type Contents = (Vec<DestRecord>, Vec<(String, Suppression)>);

/// Reads a store file, for restore and inspection.
pub fn load(conn: &Connection) -> anyhow::Result<Contents> {
    let mut dests = Vec::new();
    let mut stmt = conn.prepare("SELECT site, identity, state FROM destinations")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (site, identity, state) = row?;
        match serde_json::from_str::<DestRecord>(&state) {
            Ok(d) => dests.push(d),
            Err(e) => {
                tracing::warn!(site, identity, error = %e, "ignored an unreadable destination record (the destination starts afresh)")
            }
        }
    }
    let mut sups = Vec::new();
    let mut stmt = conn.prepare("SELECT address, since, class, reply FROM suppressions")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    for row in rows {
        let (address, since, class, reply) = row?;
        let class = Class::parse(&class).unwrap_or(Class::Unknown);
        sups.push((
            address,
            Suppression {
                since: since.max(0) as u64,
                class,
                reply,
            },
        ));
    }
    Ok((dests, sups))
}

fn quarantine(path: &Path) -> anyhow::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let aside = PathBuf::from(format!("{}.bad-{stamp}", path.display()));
    std::fs::rename(path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
    for ext in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{ext}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{ext}", aside.display()));
        }
    }
    Ok(aside)
}

impl Store {
    /// Opens the configured backend, restores the engine's state from it and starts the
    /// writer. An unreadable file stops the start with a way forward, never a silent wipe.
    pub fn open(
        config: &Config,
        engine: &Arc<Engine>,
        quarantine_bad: bool,
    ) -> anyhow::Result<Store> {
        match config.state.backend.as_str() {
            "memory" => {
                tracing::warn!("state backend is memory: suppressions and suspensions do not survive a restart");
                Ok(Store::default())
            }
            "embedded" => Store::open_embedded(Path::new(&config.state.path), engine, quarantine_bad),
            "redis" => Ok(Store {
                tx: None,
                fleet: Some(fleet::Fleet::start(config, engine)?),
            }),
            other => bail!(
                "state backend {other:?} is not available in this build; use \"embedded\", \"redis\" or \"memory\""
            ),
        }
    }

    fn open_embedded(
        path: &Path,
        engine: &Arc<Engine>,
        quarantine_bad: bool,
    ) -> anyhow::Result<Store> {
        let conn = match open_db(path).and_then(|c| load(&c).map(|l| (c, l))) {
            Ok(x) => x,
            Err(e) if quarantine_bad => {
                let aside = quarantine(path)?;
                tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %format!("{e:#}"),
                    "state file unreadable: moved aside, starting with empty state");
                let c = open_db(path)?;
                let l = load(&c)?;
                (c, l)
            }
            Err(e) => bail!(
                "state file {} is unreadable: {e:#}\n  way forward: keep it for inspection and start fresh with\n    mv {0} {0}.bad && mxpace serve …\n  or restart with --quarantine-bad-state, which does the same",
                path.display()
            ),
        };
        let (conn, (dests, sups)) = conn;
        let (nd, ns) = (dests.len(), sups.len());
        let restored = engine.restore(dests, sups);
        tracing::info!(file = %path.display(), destinations = restored, stored_destinations = nd, suppressions = ns, "state restored");
        let (tx, rx) = mpsc::channel();
        let (jtx, jrx) = mpsc::channel::<Change>();
        engine.attach_journal(jtx);
        // Engine changes arrive on their own channel; forward them in order with barriers
        // by letting the writer drain the journal before each batch.
        std::thread::Builder::new()
            .name("mxpace-store".into())
            .spawn(move || writer(conn, rx, jrx))
            .context("starting the store writer")?;
        Ok(Store {
            tx: Some(tx),
            fleet: None,
        })
    }

    /// Fleet mode's handle, for the decisions that go through Redis.
    pub fn fleet(&self) -> Option<&Arc<fleet::Fleet>> {
        self.fleet.as_ref()
    }

    /// Fleet mode: waits briefly for the first join, so a start with Redis reachable
    /// serves with the fleet's state loaded. Returns at once for the other backends.
    pub async fn wait_ready(&self) {
        if let Some(f) = &self.fleet {
            f.wait_joined().await;
        }
    }

    /// Resolves once every change made before this call is committed.
    pub async fn sync(&self) {
        if let Some(f) = &self.fleet {
            return f.sync().await;
        }
        if let Some(tx) = &self.tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Barrier(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }

    /// Writes destinations changed since the last flush.
    pub async fn flush_adaptive(&self, engine: &Engine) {
        if let Some(f) = &self.fleet {
            return f.flush(engine);
        }
        if let Some(tx) = &self.tx {
            let dirty = engine.take_dirty();
            if !dirty.is_empty() {
                let _ = tx.send(Msg::Dests(dirty));
            }
        }
    }

    /// Commits what is pending and stops the writer.
    pub async fn close(&self) {
        if let Some(f) = &self.fleet {
            return f.close().await;
        }
        if let Some(tx) = &self.tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Close(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }
}

fn apply(tx: &rusqlite::Transaction<'_>, change: &Change) -> rusqlite::Result<()> {
    match change {
        Change::Suppress(addr, s) => {
            tx.execute(
                "INSERT OR REPLACE INTO suppressions (address, since, class, reply) VALUES (?1, ?2, ?3, ?4)",
                params![addr, s.since as i64, s.class.as_str(), s.reply],
            )?;
        }
        Change::Unsuppress(addr) => {
            tx.execute("DELETE FROM suppressions WHERE address = ?1", params![addr])?;
        }
        Change::Dest(d) => put_dest(tx, d)?,
    }
    Ok(())
}

fn put_dest(tx: &rusqlite::Transaction<'_>, d: &DestRecord) -> rusqlite::Result<()> {
    let json = serde_json::to_string(d).unwrap_or_default();
    tx.execute(
        "INSERT OR REPLACE INTO destinations (site, identity, state, updated) VALUES (?1, ?2, ?3, ?4)",
        params![d.site, d.identity, json, d.last_seen as i64],
    )?;
    Ok(())
}

/// The writer thread: batches whatever is queued into one transaction, then answers
/// the barriers that were waiting for it.
fn writer(mut conn: Connection, rx: mpsc::Receiver<Msg>, journal: mpsc::Receiver<Change>) {
    let mut barriers = Vec::new();
    loop {
        let first = match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(m) => Some(m),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut batch: Vec<Msg> = first.into_iter().collect();
        batch.extend(rx.try_iter());
        // Journal entries were sent before any barrier that follows them was sent.
        let changes: Vec<Change> = journal.try_iter().collect();
        if batch.is_empty() && changes.is_empty() {
            continue;
        }
        let mut close = None;
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            for c in &changes {
                apply(&tx, c)?;
            }
            for m in batch {
                match m {
                    Msg::Dests(ds) => {
                        for d in &ds {
                            put_dest(&tx, d)?;
                        }
                    }
                    Msg::Barrier(b) => barriers.push(b),
                    Msg::Close(b) => close = Some(b),
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            crate::metrics::store_error();
            tracing::error!(error = %e, "state store write failed");
        }
        for b in barriers.drain(..) {
            let _ = b.send(());
        }
        if let Some(c) = close {
            let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
            let _ = c.send(());
            break;
        }
    }
}
