//! A log file that never grows past a cap and keeps its tail: what the guest
//! writes on its console is the attacker's, so it must not fill the host's
//! `/run`.
//!
//! QEMU writes the console into a socket whose other end a husk thread
//! reads ([`spawn_console_reader`]) into a [`CappedLog`]. When a write would
//! pass the cap, the file is rewritten to its last half (or, for a write
//! larger than that, the write's own tail), so rewriting costs O(1) per byte
//! written.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The smallest cap honoured (a smaller configured cap is raised to it).
pub const MIN_CAP: u64 = 4096;

/// A size-capped log file that keeps its most recent bytes.
pub struct CappedLog {
    file: File,
    len: u64,
    cap: u64,
}

impl CappedLog {
    /// Creates (or truncates) `path`, mode 0600, capped at `cap` bytes.
    pub fn create(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        let file = File::options()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        Ok(CappedLog {
            file,
            len: 0,
            cap: cap.max(MIN_CAP),
        })
    }

    /// Appends `data`, dropping the oldest bytes to stay within the cap.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let n = data.len() as u64;
        if self.len + n <= self.cap {
            self.file.write_all_at(data, self.len)?;
            self.len += n;
            return Ok(());
        }
        let keep = (self.cap / 2).max(n.min(self.cap));
        let mut out = Vec::with_capacity(keep as usize);
        if n < keep {
            let old = (keep - n).min(self.len);
            let mut buf = vec![0u8; old as usize];
            self.file.read_exact_at(&mut buf, self.len - old)?;
            out.extend_from_slice(&buf);
            out.extend_from_slice(data);
        } else {
            out.extend_from_slice(&data[(n - keep) as usize..]);
        }
        self.file.set_len(0)?;
        self.file.write_all_at(&out, 0)?;
        self.len = out.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Copies everything read from `from` into a [`CappedLog`] at `path` until
/// end of input (QEMU gone), on a thread of its own.
pub fn spawn_console_reader(from: UnixStream, path: &Path, cap: u64) -> std::io::Result<()> {
    let mut log = CappedLog::create(path, cap)?;
    let mut from = from;
    std::thread::Builder::new()
        .name("husk-console".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if let Err(e) = log.write(&buf[..n]) {
                            tracing::warn!(error = %e, "cannot write the console log; dropping guest output");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("husk-caplog-{tag}-{}", std::process::id()))
    }

    #[test]
    fn never_exceeds_the_cap_and_keeps_the_tail() {
        let p = path("tail");
        let cap = 8192;
        let mut log = CappedLog::create(&p, cap).unwrap();
        let mut all = Vec::new();
        for i in 0..5000u32 {
            let line = format!("line {i} {}\n", "x".repeat((i % 97) as usize));
            log.write(line.as_bytes()).unwrap();
            all.extend_from_slice(line.as_bytes());
            let on_disk = std::fs::metadata(&p).unwrap().len();
            assert!(on_disk <= cap, "{on_disk} > {cap}");
            assert_eq!(on_disk, log.len());
        }
        let got = std::fs::read(&p).unwrap();
        assert!(got.len() as u64 >= cap / 2);
        assert!(
            all.ends_with(&got),
            "the log is not the tail of what was written"
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn one_huge_write_keeps_its_own_tail() {
        let p = path("huge");
        let mut log = CappedLog::create(&p, 4096).unwrap();
        log.write(b"start\n").unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        log.write(&big).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 4096);
        assert_eq!(&got[..], &big[big.len() - 4096..]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_tiny_cap_is_raised() {
        let p = path("tiny");
        let mut log = CappedLog::create(&p, 1).unwrap();
        log.write(&[b'a'; 3000]).unwrap();
        assert_eq!(log.len(), 3000);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn the_reader_copies_until_end_of_input() {
        use std::io::Write;
        let p = path("reader");
        let (mut a, b) = UnixStream::pair().unwrap();
        spawn_console_reader(b, &p, 4096).unwrap();
        for _ in 0..1000 {
            a.write_all(&[b'z'; 100]).unwrap();
        }
        a.write_all(b"THE END").unwrap();
        drop(a);
        let ok = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            std::fs::read(&p).is_ok_and(|d| d.ends_with(b"THE END"))
        });
        assert!(ok);
        assert!(std::fs::metadata(&p).unwrap().len() <= 4096);
        std::fs::remove_file(&p).unwrap();
    }
}
