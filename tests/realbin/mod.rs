//! Helpers for the tests that run the real `sclb` binary (tests/chaos.rs, tests/limits.rs): a
//! process guard that kills sclb by its PID when dropped (a failing test included), its JSON log
//! read back line by line, its RSS and open fds from /proc, its admin socket, and the loopback
//! helpers the clients need (source addresses 127.0.0.2.., ports outside the ephemeral range,
//! the file-descriptor limit), and an echo backend with an L4 round trip through sclb.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A running `sclb` process, killed (SIGKILL, by PID) when dropped.
pub struct SclbProcess {
    child: Child,
    pub pid: u32,
    pub config: PathBuf,
    pub admin: PathBuf,
    pub log: PathBuf,
}

impl SclbProcess {
    /// Writes `config` to `dir/sclb.toml` and runs `sclb -c` on it, its log (stderr) going to
    /// `dir/sclb.log`. `wrapper` is a command that execs the rest, e.g. `prlimit --nofile=..`:
    /// the PID is then sclb's own.
    pub fn start(dir: &Path, config: &str, wrapper: &[&str]) -> SclbProcess {
        let path = dir.join("sclb.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("sclb.log");
        let bin = sclb_bin();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("-c")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sclb starts");
        SclbProcess {
            pid: child.id(),
            child,
            config: path,
            admin: dir.join("admin.sock"),
            log,
        }
    }

    /// The address frontend `name` listens on, from its "listening" log line (configs bind port
    /// 0, so that tests never collide on a port). Waits up to 10 s.
    pub fn frontend_addr(&mut self, name: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for l in self.log_lines() {
                if message(&l) == "listening" && field(&l, "frontend") == name {
                    return field(&l, "addr").parse().unwrap();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sclb exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "sclb did not listen within 10 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address frontend `name` listens on, or None if sclb exited or did not listen
    /// within `within`.
    pub fn try_frontend_addr(&mut self, name: &str, within: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            for l in self.log_lines() {
                if message(&l) == "listening" && field(&l, "frontend") == name {
                    return field(&l, "addr").parse().ok();
                }
            }
            if !self.is_running() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// How sclb exited, if it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every JSON log line so far (a line being written is skipped).
    pub fn log_lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap()
            .count()
    }

    /// Open file descriptors by kind: (sockets, pipes, others).
    pub fn fd_kinds(&self) -> (usize, usize, usize) {
        fd_kinds(self.pid)
    }

    /// One admin command over the Unix socket; the reply without its final empty line.
    /// The `/metrics` page, from the stats listener its log names.
    pub fn metrics(&self) -> String {
        let stats: SocketAddr = self
            .log_lines()
            .iter()
            .find(|l| message(l).starts_with("stats page on"))
            .map(|l| field(l, "addr").parse().unwrap())
            .expect("stats listener");
        let mut tcp = std::net::TcpStream::connect(stats).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut page = String::new();
        tcp.read_to_string(&mut page).unwrap();
        page
    }

    pub fn admin(&self, line: &str) -> String {
        admin(&self.admin, line)
    }

    /// A field of `show info`, as a number.
    pub fn info(&self, key: &str) -> u64 {
        let info = self.admin("show info");
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in show info:\n{info}"))
    }

    /// Waits (bounded) until `cond` holds; false if it never did.
    pub fn wait_for(&self, within: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if cond(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        cond(self)
    }
}

impl Drop for SclbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failing test: show what sclb said, without the per-connection lines.
            let text = self.log_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("\"connection closed\""))
                .collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- sclb log (last {} lines but connection ends) ---",
                tail.len()
            );
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// Open fds of a process by kind: (sockets, pipes, others). Pipes are counted apart because
/// sclb keeps a pool of empty kernel pipes for splice(2) (src/pipe.rs, up to 64 per thread).
pub fn fd_kinds(pid: u32) -> (usize, usize, usize) {
    let mut k = (0, 0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return k;
    };
    for e in dir.flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        if t.starts_with("socket:") {
            k.0 += 1;
        } else if t.starts_with("pipe:") {
            k.1 += 1;
        } else {
            k.2 += 1;
        }
    }
    k
}

/// The binary under test: the one cargo built for this test run, or `SCLB_BIN` (to measure a
/// release build: `SCLB_BIN=target/release/sclb cargo test --test limits -- --nocapture`).
pub fn sclb_bin() -> std::ffi::OsString {
    std::env::var_os("SCLB_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sclb").into())
}

/// Sends one line to an admin socket and reads the reply (10 s at most). sclb binds its
/// frontends before its admin socket: a socket not there yet (or not listening yet) is waited
/// for, up to 10 s.
pub fn admin(path: &Path, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("admin socket {}: {e}", path.display()),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

pub fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// A field of a log line, as text ("" if absent).
pub fn field<'a>(line: &'a Value, name: &str) -> &'a str {
    line["fields"][name].as_str().unwrap_or("")
}

/// When a log line was written.
pub fn timestamp(line: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(line["timestamp"].as_str()?).ok()
}

/// Connects to `dst` from 127.0.0.`n`, within 10 s.
pub async fn connect_from(n: u8, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, n), 0)))?;
    match tokio::time::timeout(Duration::from_secs(10), s.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// A port for a listener that a test stops and binds again (a killed and restarted backend):
/// below the ephemeral range, so that no outgoing connection can take it while it is closed.
pub fn stable_port(seed: usize) -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        low > 12_000,
        "ephemeral ports start at {low}: no room below"
    );
    let span = (low - 11_000) as usize;
    let mix = (std::process::id() as usize).wrapping_mul(7919) + seed * 104_729;
    10_000 + (mix % span) as u16
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

/// The bytes a client sends: byte `pos` of stream `seed` is a pure function of both, so that a
/// checker can regenerate what it should have received at any offset, however the bytes were cut.
pub fn pattern(seed: u64, mut pos: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(seed ^ (pos / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// How many bytes of `got`, received at offset `pos` of stream `seed`, differ from what was sent.
pub fn corrupted(seed: u64, pos: u64, got: &[u8], scratch: &mut Vec<u8>) -> u64 {
    scratch.resize(got.len(), 0);
    pattern(seed, pos, scratch);
    got.iter()
        .zip(scratch.iter())
        .filter(|(a, b)| a != b)
        .count() as u64
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An echo backend that greets each connection with "hi\n".
pub async fn echo_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(b"hi\n").await.is_ok() {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    addr
}

/// One L4 round trip: greeted, and an echo. Within `within`.
pub async fn l4_serves(addr: SocketAddr, within: Duration) -> bool {
    let once = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let mut b = [0u8; 3];
        s.read_exact(&mut b).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut p = [0u8; 4];
        s.read_exact(&mut p).await.ok()?;
        Some(&b == b"hi\n" && &p == b"ping")
    };
    matches!(tokio::time::timeout(within, once).await, Ok(Some(true)))
}
