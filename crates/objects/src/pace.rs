//! A rate for background copying (resyncs), shared by every object of a
//! host: each piece reserves its slot of time at the rate, and waits for
//! it. Idle time does not accumulate into a burst.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct Pace {
    bytes_per_second: u64,
    /// When the next piece may start.
    next: Mutex<Option<Instant>>,
}

impl Pace {
    /// `None` for 0: unpaced.
    pub fn new(bytes_per_second: u64) -> Option<Pace> {
        (bytes_per_second > 0).then(|| Pace { bytes_per_second, next: Mutex::new(None) })
    }

    /// Waits until `bytes` may go.
    pub async fn take(&self, bytes: u64) {
        let start = {
            let mut next = self.next.lock().expect("pace lock");
            let now = Instant::now();
            let start = next.map_or(now, |next| next.max(now));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pieces_are_spaced_at_the_rate_and_idle_time_is_not_saved_up() {
        let pace = Pace::new(1 << 20).unwrap();
        let began = Instant::now();
        for _ in 0..4 {
            pace.take(256 << 10).await;
        }
        // The first piece goes at once, each next one a quarter second on.
        assert_eq!(began.elapsed(), Duration::from_millis(750));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let resumed = Instant::now();
        pace.take(256 << 10).await;
        pace.take(256 << 10).await;
        assert_eq!(resumed.elapsed(), Duration::from_millis(250), "ten idle seconds bought no burst");
        assert!(Pace::new(0).is_none());
    }
}
