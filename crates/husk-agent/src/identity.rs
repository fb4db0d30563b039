//! `RenewIdentity`: a guest restored from a VM template gets an identity of
//! its own before any container runs. Every clone of a template starts with
//! the template's kernel RNG state, clock and hostname; the host sends
//! fresh entropy (mixed in and the CRNG reseeded at once), its time and a
//! hostname. `/proc/sys/kernel/random/boot_id` is made on its first read,
//! which the template never does, so each clone makes its own (from the
//! reseeded CRNG).

use std::fs::OpenOptions;
use std::os::fd::AsFd;

use husk_protocol::agent::RenewIdentityRequest;

/// Most entropy accepted at once (the kernel takes any amount; more is
/// pointless).
pub const MAX_ENTROPY: usize = 512;
/// Least entropy that counts as a reseed (the CRNG's key is 32 bytes).
pub const MIN_ENTROPY: usize = 32;

/// Why `RenewIdentity` failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A field of the request is out of range; the message names the field
    /// and its value (never the entropy bytes, only their count).
    #[error("RenewIdentity: {0}")]
    Invalid(String),
    /// The kernel refused a step; nothing after it was done.
    #[error("RenewIdentity: {what}")]
    Sys {
        /// The step that failed.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

/// A checked `RenewIdentityRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// [`MIN_ENTROPY`] to [`MAX_ENTROPY`] bytes from the host.
    pub entropy: Vec<u8>,
    /// Seconds since the epoch, above 0.
    pub realtime_sec: i64,
    /// Below 1e9.
    pub realtime_nsec: u32,
    /// Non-empty, at most 64 bytes of `[a-zA-Z0-9-.]`, not starting with `-`.
    pub hostname: String,
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && !h.starts_with('-')
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl Identity {
    /// Checks every field; the error names the field and the bad value.
    pub fn parse(req: &RenewIdentityRequest) -> Result<Identity, IdentityError> {
        let n = req.entropy.len();
        if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&n) {
            return Err(IdentityError::Invalid(format!(
                "entropy is {n} bytes; {MIN_ENTROPY} to {MAX_ENTROPY} are accepted"
            )));
        }
        if req.realtime_sec <= 0 {
            return Err(IdentityError::Invalid(format!(
                "realtime_sec {} is not a time after 1970",
                req.realtime_sec
            )));
        }
        if req.realtime_nsec >= 1_000_000_000 {
            return Err(IdentityError::Invalid(format!(
                "realtime_nsec {} is not below one second",
                req.realtime_nsec
            )));
        }
        if !valid_hostname(&req.hostname) {
            return Err(IdentityError::Invalid(format!(
                "hostname {:?} is not an RFC 1123 name of at most 64 bytes",
                req.hostname
            )));
        }
        Ok(Identity {
            entropy: req.entropy.clone(),
            realtime_sec: req.realtime_sec,
            realtime_nsec: req.realtime_nsec,
            hostname: req.hostname.clone(),
        })
    }

    /// Reseeds the RNG, sets the clock and the hostname, in that order;
    /// the first step that fails stops the rest. Needs CAP_SYS_ADMIN and
    /// CAP_SYS_TIME (the agent, PID 1, has them).
    pub fn apply(&self) -> Result<(), IdentityError> {
        let sys = |what| move |source| IdentityError::Sys { what, source };
        let random = OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(sys("opening /dev/urandom"))?;
        crate::sys::add_entropy_and_reseed(random.as_fd(), &self.entropy)
            .map_err(sys("mixing host entropy into the kernel's pool"))?;
        let ts = nix::sys::time::TimeSpec::new(self.realtime_sec, self.realtime_nsec as i64);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| {
            IdentityError::Sys {
                what: "setting the clock",
                source: e.into(),
            }
        })?;
        nix::unistd::sethostname(&self.hostname).map_err(|e| IdentityError::Sys {
            what: "setting the hostname",
            source: e.into(),
        })?;
        tracing::debug!(
            entropy_bytes = self.entropy.len(),
            realtime_sec = self.realtime_sec,
            hostname = %self.hostname,
            "identity renewed"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req() -> RenewIdentityRequest {
        RenewIdentityRequest {
            entropy: vec![7; 64],
            realtime_sec: 1_796_000_000,
            realtime_nsec: 5,
            hostname: "husk-c1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_bounds_are_inclusive() {
        for (n, host) in [
            (MIN_ENTROPY, "a".repeat(64)),
            (MAX_ENTROPY, "a-b.c9".into()),
        ] {
            let mut r = req();
            r.entropy = vec![0; n];
            r.hostname = host;
            r.realtime_nsec = 999_999_999;
            assert!(Identity::parse(&r).is_ok(), "{n} bytes");
        }
    }

    #[test]
    fn a_good_request_parses() {
        let id = Identity::parse(&req()).unwrap();
        assert_eq!(id.hostname, "husk-c1");
        assert_eq!(id.entropy.len(), 64);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Edit = Box<dyn Fn(&mut RenewIdentityRequest)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|r| r.entropy = vec![1; 31]), "entropy is 31 bytes"),
            (
                Box::new(|r| r.entropy = vec![1; 513]),
                "entropy is 513 bytes",
            ),
            (Box::new(|r| r.realtime_sec = 0), "realtime_sec 0"),
            (
                Box::new(|r| r.realtime_nsec = 1_000_000_000),
                "realtime_nsec",
            ),
            (Box::new(|r| r.hostname = String::new()), "hostname \"\""),
            (Box::new(|r| r.hostname = "-x".into()), "hostname \"-x\""),
            (Box::new(|r| r.hostname = "a b".into()), "hostname \"a b\""),
            (Box::new(|r| r.hostname = "a".repeat(65)), "at most 64"),
            (Box::new(|r| r.hostname = "a_b".into()), "hostname \"a_b\""),
            (Box::new(|r| r.realtime_sec = -1), "realtime_sec -1"),
        ];
        for (edit, want) in cases {
            let mut r = req();
            edit(&mut r);
            let e = Identity::parse(&r).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(
            entropy in proptest::collection::vec(any::<u8>(), 0..600),
            sec in any::<i64>(),
            nsec in any::<u32>(),
            hostname in ".{0,80}",
        ) {
            let r = RenewIdentityRequest { entropy, realtime_sec: sec, realtime_nsec: nsec, hostname, ..Default::default() };
            let _ = Identity::parse(&r);
        }
    }
}
