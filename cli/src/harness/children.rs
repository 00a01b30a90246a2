//! Starting many real processes of this binary together on a barrier and collecting what
//! they print: what `stress` and `soak` are made of.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::interrupt;
use crate::error::Error;

/// What one process did.
pub struct Output {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl Output {
    /// The error line the process printed (without `error: `), if it failed.
    pub fn failure(&self) -> Option<&str> {
        (!self.success).then(|| {
            self.line("error: ")
                .unwrap_or("exited without an error line")
        })
    }

    /// The hint the process printed with its error (without `hint: `), if it failed.
    pub fn hint(&self) -> Option<&str> {
        (!self.success).then(|| self.line("hint: ")).flatten()
    }

    /// The first line of stderr that starts with `prefix`, without it.
    fn line(&self, prefix: &str) -> Option<&str> {
        self.stderr.lines().find_map(|l| l.strip_prefix(prefix))
    }
}

/// Removes what SQLite and the fair queue leave next to a run's database once it is checked.
pub fn remove_side_files(db: &Path) {
    for suffix in ["-wal", "-shm", "-lock"] {
        let _ = std::fs::remove_file(crate::commands::side_path(db, suffix));
    }
}

/// Kills and reaps `children`.
fn stop<'a>(children: impl Iterator<Item = &'a mut Child>) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A thread reading one pipe of a child to its end.
type Drain = std::thread::JoinHandle<String>;

fn drain(pipe: Option<impl Read + Send + 'static>) -> Result<Drain, Error> {
    std::thread::Builder::new()
        .spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
        .map_err(|e| Error::Run {
            reason: format!("cannot start a thread to read a process's output: {e}"),
        })
}

/// Starts `n` processes of this binary with `args` and `--db db`, releases them together once
/// all are ready, and waits (at most `limit`, then kills them) for all to end. Returns their
/// outputs and the seconds from the release to the last exit. Shows progress on a terminal.
/// The barrier files go next to a database file, in `barrier_dir` for a server's database.
pub fn run_together(
    label: &str,
    db: &Path,
    barrier_dir: Option<&Path>,
    args: &[String],
    n: usize,
    limit: Duration,
) -> Result<(Vec<Output>, f64), Error> {
    let io = |operation, source| Error::Io {
        operation,
        path: db.to_owned(),
        source,
    };
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        operation: "find the path of",
        path: PathBuf::from("the running binary"),
        source,
    })?;
    // A name of this run's own: a file a user or an interrupted run left is never touched,
    // nor counted as ready.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let barrier = match barrier_dir {
        Some(dir) => dir.join(format!("barrier-{}-{nanos}", std::process::id())),
        None => PathBuf::from(format!(
            "{}.barrier-{}-{nanos}",
            db.display(),
            std::process::id()
        )),
    };
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for _ in 0..n {
        let child = Command::new(&exe)
            .args(args)
            .arg("--db")
            .arg(db)
            .arg("--barrier")
            .arg(&barrier)
            .env_remove("SQLITE_PERSISTENCE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match child {
            Ok(child) => children.push(child),
            Err(e) => {
                children.iter_mut().for_each(|c| drop(c.kill()));
                return Err(io("start a process for", e));
            }
        }
    }
    let ready_prefix = format!("{}.ready-", barrier.file_name().unwrap().to_string_lossy());
    let dir = barrier.parent().unwrap_or(Path::new("."));
    let result = release_and_collect(label, &barrier, &ready_prefix, dir, children, limit);
    let _ = std::fs::remove_file(&barrier);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&ready_prefix)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    result
}

fn release_and_collect(
    label: &str,
    barrier: &Path,
    ready_prefix: &str,
    dir: &Path,
    mut children: Vec<Child>,
    limit: Duration,
) -> Result<(Vec<Output>, f64), Error> {
    let io = |operation, source| Error::Io {
        operation,
        path: dir.to_owned(),
        source,
    };
    let n = children.len();
    let start = Instant::now();
    loop {
        let ready = std::fs::read_dir(dir)
            .map_err(|e| io("list the directory", e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(ready_prefix))
            .count();
        if ready == n {
            break;
        }
        if interrupt::interrupted() {
            stop(children.iter_mut());
            return Err(Error::Interrupted);
        }
        if start.elapsed() > Duration::from_secs(60) {
            children.iter_mut().for_each(|c| drop(c.kill()));
            return Err(Error::Run {
                reason: format!("only {ready} of {n} processes started within 60 s"),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let released = Instant::now();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(barrier)
        .map_err(|e| io("release the barrier in", e))?;
    let progress = std::io::stderr().is_terminal();
    // Read every child's output while it runs: a child that fills its pipe (64 KiB, some
    // 800 JSON lines) would block in write() until someone reads.
    let mut running: Vec<(Child, Drain, Drain)> = Vec::with_capacity(n);
    let mut children = children.into_iter();
    while let Some(mut child) = children.next() {
        let drains =
            drain(child.stdout.take()).and_then(|stdout| Ok((stdout, drain(child.stderr.take())?)));
        match drains {
            Ok((stdout, stderr)) => running.push((child, stdout, stderr)),
            Err(error) => {
                stop(std::iter::once(&mut child).chain(children.as_mut_slice()));
                stop(running.iter_mut().map(|(c, _, _)| c));
                return Err(error);
            }
        }
    }
    let mut outputs = Vec::with_capacity(n);
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            match running[i]
                .0
                .try_wait()
                .map_err(|e| io("wait for a process in", e))?
            {
                Some(status) => {
                    let (_, stdout, stderr) = running.swap_remove(i);
                    outputs.push(Output {
                        success: status.success(),
                        stdout: stdout.join().unwrap_or_default(),
                        stderr: stderr.join().unwrap_or_default(),
                    });
                }
                None => i += 1,
            }
        }
        if interrupt::interrupted() {
            stop(running.iter_mut().map(|(c, _, _)| c));
            return Err(Error::Interrupted);
        }
        if released.elapsed() > limit {
            running.iter_mut().for_each(|(c, _, _)| drop(c.kill()));
            return Err(Error::Run {
                reason: format!("processes still running after {} s", limit.as_secs()),
            });
        }
        if progress {
            eprint!("\r{label}: {}/{n} processes done", outputs.len());
            let _ = std::io::stderr().flush();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if progress {
        eprint!("\r\x1b[K");
    }
    Ok((outputs, released.elapsed().as_secs_f64()))
}
