//! Polling with a deadline.

use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(10);

/// What a polled condition returns: `bool` (done or not), or `Option<T>`
/// (done with a value).
pub trait Ready {
    type Output;
    fn ready(self) -> Option<Self::Output>;
}

impl Ready for bool {
    type Output = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Output = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `cond` until it is ready or `timeout` passes; `None` on timeout.
/// For conditions that are allowed not to happen (asserting that something
/// does *not* occur within a window).
pub fn try_wait_until<R: Ready>(
    timeout: Duration,
    mut cond: impl FnMut() -> R,
) -> Option<R::Output> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().ready() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `cond` until it is ready and returns its value; fails the test
/// with "timed out after T waiting for `what`" if `timeout` passes first.
#[track_caller]
pub fn wait_until<R: Ready>(timeout: Duration, what: &str, cond: impl FnMut() -> R) -> R::Output {
    match try_wait_until(timeout, cond) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_as_soon_as_ready_not_after_a_fixed_sleep() {
        let start = Instant::now();
        wait_until(Duration::from_secs(5), "true", || true);
        assert!(start.elapsed() < Duration::from_secs(1));
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "the third poll", || {
            n += 1;
            (n == 3).then_some(n * 10)
        });
        assert_eq!(v, 30);
    }

    #[test]
    fn times_out() {
        assert_eq!(try_wait_until(Duration::from_millis(30), || false), None);
        let e = std::panic::catch_unwind(|| {
            wait_until(Duration::from_millis(30), "never", || None::<()>)
        })
        .unwrap_err();
        let msg = e.downcast_ref::<String>().unwrap();
        assert!(msg.contains("waiting for never"), "{msg}");
    }
}
