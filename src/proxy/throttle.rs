//! `--throttle`: a token bucket per direction, refilled every 100 ms.

use super::*;

/// Throttle accounting period: short, so a throttled stream flows smoothly.
pub(super) const THROTTLE_WINDOW: Duration = Duration::from_millis(100);

/// `--throttle`: each direction may relay a fixed number of bytes per window; a direction
/// that used its share stops reading until the window ends.
#[derive(Debug)]
pub(super) struct Throttle {
    pub(super) per_window: usize,
    pub(super) window_start: Instant,
    pub(super) up_left: usize,
    pub(super) down_left: usize,
}

impl Throttle {
    pub(super) fn new(bytes_per_sec: u64, now: Instant) -> Self {
        let per_window = usize::try_from(bytes_per_sec / 10)
            .unwrap_or(usize::MAX)
            .max(1);
        Throttle {
            per_window,
            window_start: now,
            up_left: per_window,
            down_left: per_window,
        }
    }

    pub(super) fn refill(&mut self, now: Instant) {
        if now >= self.window_start + THROTTLE_WINDOW {
            self.window_start = now;
            self.up_left = self.per_window;
            self.down_left = self.per_window;
        }
    }

    /// When a stopped direction may read again.
    pub(super) fn resume_at(&self) -> Option<Instant> {
        (self.up_left == 0 || self.down_left == 0).then_some(self.window_start + THROTTLE_WINDOW)
    }
}
