//! A real PostgreSQL for the session-store tests: Debian's `postgresql` package (installed by
//! scripts/test), `initdb` in a temp dir, the server listening on a Unix socket in that dir
//! only (no TCP port to collide on), stopped by its PID. PostgreSQL refuses to run as root, so
//! as root it runs as `nobody` (setpriv execs it: the PID is the server's own).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postgres {
    child: Option<Child>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The connection string sclb and the tests use.
    pub url: String,
    /// With TLS: the TCP port on 127.0.0.1 that takes only TLS connections.
    tls_port: Option<u16>,
    /// With TLS: the CA file that verifies the server's certificate.
    pub ca: Option<PathBuf>,
}

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`.
pub struct TestCa {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn write(dir: &Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let out = TestCa {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&out.ca, issuer.pem()).unwrap();
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}

/// The directory holding `initdb` and `postgres`: on PATH, else Debian's versioned one.
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let p = std::fs::canonicalize(&p).unwrap_or(p);
        return p.parent().unwrap().to_path_buf();
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs the postgresql package)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("an initdb under /usr/lib/postgresql")
}

fn as_db_user(bin: &Path, prog: &str) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(bin.join(prog));
        c
    } else {
        Command::new(bin.join(prog))
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// A server that takes TCP connections on 127.0.0.1 with TLS only (pg_hba `hostssl`),
    /// its certificate signed by a CA of the test; `url` asks for TLS (`sslmode=require`).
    /// `ca` is the CA file that verifies it.
    pub fn start_tls() -> Postgres {
        Postgres::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let bin = bin_dir();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
            for p in [dir.path(), &data] {
                std::os::unix::fs::chown(p, Some(nobody.uid.as_raw()), Some(nobody.gid.as_raw()))
                    .unwrap();
            }
        }
        let st = as_db_user(&bin, "initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "sclb", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("initdb runs");
        assert!(
            st.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        let mut url = format!(
            "host={} port=5432 user=sclb dbname=postgres",
            dir.path().display()
        );
        let mut tls_port = None;
        let mut ca_file = None;
        if tls {
            let ca = TestCa::write(dir.path(), "db");
            ca_file = Some(ca.ca.clone());
            // The server reads its key as its own user, mode 0600 (PostgreSQL insists).
            for (from, to) in [(&ca.cert, "server.crt"), (&ca.key, "server.key")] {
                std::fs::copy(from, data.join(to)).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(data.join(to), std::fs::Permissions::from_mode(0o600))
                    .unwrap();
                if nix::unistd::geteuid().is_root() {
                    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
                    std::os::unix::fs::chown(
                        data.join(to),
                        Some(nobody.uid.as_raw()),
                        Some(nobody.gid.as_raw()),
                    )
                    .unwrap();
                }
            }
            // Unix socket for the test's own look (pg_isready, query); TCP with TLS only.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
            // PostgreSQL cannot take port 0: a port the kernel just gave out and released.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            tls_port = Some(port);
            url = format!("host=127.0.0.1 port={port} user=sclb dbname=postgres sslmode=require");
        }
        let mut pg = Postgres {
            child: None,
            dir,
            bin,
            url,
            tls_port,
            ca: ca_file,
        };
        pg.resume();
        pg
    }

    /// Starts the server (again) on the same data.
    pub fn resume(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).unwrap();
        let mut cmd = as_db_user(&self.bin, "postgres");
        cmd.arg("-D").arg(self.dir.path().join("data"));
        match self.tls_port {
            None => cmd.args(["-c", "listen_addresses=", "-p", "5432"]),
            Some(port) => cmd.args([
                "-c".to_string(),
                "listen_addresses=127.0.0.1".to_string(),
                "-c".to_string(),
                "ssl=on".to_string(),
                "-p".to_string(),
                port.to_string(),
            ]),
        };
        let child = cmd
            .args(["-c", "fsync=off", "-k"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        // Accepting connections, not only listening (a starting server refuses them).
        let ready = || {
            Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.dir.path())
                .args(["-p", &self.port().to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success())
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "postgres did not listen within 60 s: {}",
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: SIGINT to its PID) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn port(&self) -> u16 {
        self.tls_port.unwrap_or(5432)
    }

    /// One query's rows, each as text columns (a test's look into the table), through the
    /// Unix socket.
    pub async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let local = format!(
            "host={} port={} user=sclb dbname=postgres",
            self.dir.path().display(),
            self.port()
        );
        let (client, conn) = tokio_postgres::connect(&local, tokio_postgres::NoTls)
            .await
            .expect("connect to the test postgres");
        let task = tokio::spawn(conn);
        let rows = client.simple_query(sql).await.expect("query");
        drop(client);
        let _ = task.await;
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
