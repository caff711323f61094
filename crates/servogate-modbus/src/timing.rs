//! Sub-millisecond waits and RTU character timing.
//!
//! tokio's timer wheel has a 1 ms tick and rounds every sleep up to it, which on its own
//! would cost each RTU transaction up to 1 ms of its 6.65 ms budget (115200 baud, 10
//! registers). The bus task instead waits on a Linux `timerfd` registered with tokio's
//! reactor: the kernel wakes us within tens of microseconds, and a deadline that must not
//! be overshot spins only the last of them (a lead learned from this thread's wake-ups).

use std::io;
use std::time::Duration;

use timerfd::{ClockId, SetTimeFlags, TimerFd, TimerState};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// A one-shot timer with microsecond resolution, reusable for every wait of one task.
pub struct PreciseTimer {
    fd: AsyncFd<TimerFd>,
    /// How long before a deadline [`PreciseTimer::sleep_until`] wakes, to spin the rest.
    lead: Lead,
}

/// How early to wake for a deadline that must not be overshot: the 90th percentile of
/// how late this thread's wake-ups come, learned as they happen.
///
/// A fixed lead has to cover the worst wake-up a machine ever gives, and spins away the
/// difference every time: 150 us of lead cost 40-60 us of CPU per sample on the
/// benchmark VM, whose wake-ups come 20-40 us late and now and then 100 us. The lead
/// follows the lateness instead (a frugal quantile estimate: up nine steps when a
/// wake-up came later than the lead, down one step when it came earlier, so it settles
/// where nine wake-ups in ten are covered). The one in ten that is later than the lead
/// overshoots the deadline by the difference, which costs a little of the line's rate
/// and nothing else: t3.5 is a least silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lead {
    micros: u32,
}

impl Lead {
    /// Where the lead starts, before any wake-up has been seen.
    const START_US: u32 = 50;
    /// A wake-up later than this is a preemption, not the timer's latency: the lead is
    /// never longer (spinning longer would not have helped it).
    const MAX_US: u32 = 150;

    pub fn new() -> Self {
        Self {
            micros: Self::START_US,
        }
    }

    pub fn get(self) -> Duration {
        Duration::from_micros(u64::from(self.micros))
    }

    /// Learns from one wake-up that came `late` after the time it was asked for.
    pub fn learn(&mut self, late: Duration) {
        self.micros = if late > self.get() {
            (self.micros + 9).min(Self::MAX_US)
        } else {
            self.micros.saturating_sub(1)
        };
    }
}

impl Default for Lead {
    fn default() -> Self {
        Self::new()
    }
}

impl PreciseTimer {
    /// Creates the timer. Must be called inside a tokio runtime with IO enabled.
    #[allow(unsafe_code)]
    pub fn new() -> io::Result<Self> {
        let fd = TimerFd::new_custom(ClockId::Monotonic, true, true)?;
        // SAFETY: the TimerFd owns its descriptor and closes it only when dropped, which
        // happens after the AsyncFd that owns it deregisters it; `as_raw_fd` always returns
        // that one descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            fd,
            lead: Lead::new(),
        })
    }

    /// Waits until `deadline`; returns at once when it has passed.
    ///
    /// Cancellation-safe: dropping the future leaves the timer armed, and the next call
    /// re-arms it before waiting, so a stale expiry is read and discarded.
    pub async fn sleep_until(&mut self, deadline: Instant) -> io::Result<()> {
        // The kernel wakes a thread tens of microseconds after its timer expires (more
        // in a VM): sleep until the learned lead before the deadline, then spin the rest.
        // Without the spin the benchmark's line falls below 95 % of its physical limit.
        let wake = deadline.checked_sub(self.lead.get()).unwrap_or(deadline);
        if self.wake_at(wake).await? {
            self.lead
                .learn(Instant::now().saturating_duration_since(wake));
        }
        while Instant::now() < deadline {
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// Waits until `wake` or a little after (the kernel's wake-up latency, tens of
    /// microseconds), without spinning: for waits whose exact end matters less than the
    /// CPU, such as the next poll. One wake-up, where tokio's 1 ms timer wheel can take
    /// two or three for one sleep.
    ///
    /// Cancellation-safe, as [`PreciseTimer::sleep_until`]. Returns whether it slept
    /// (false when `wake` had passed already).
    pub async fn wake_at(&mut self, wake: Instant) -> io::Result<bool> {
        let mut slept = false;
        loop {
            let now = Instant::now();
            if wake <= now {
                break;
            }
            slept = true;
            // A zero duration would disarm the timer instead of firing it.
            let wait = (wake - now).max(Duration::from_micros(1));
            self.fd
                .get_mut()
                .set_state(TimerState::Oneshot(wait), SetTimeFlags::Default);
            let mut guard = self.fd.readable().await?;
            // `read` on a non-blocking timerfd returns 0 when it has not expired yet, and
            // consumes the expiry when it has: either way the descriptor is not readable
            // now. Left marked ready, the next wait would arm the timer, find the stale
            // mark, read nothing and arm it again (two syscalls per wait).
            guard.get_inner().read();
            guard.clear_ready();
        }
        Ok(slept)
    }

    /// Waits for `duration`.
    pub async fn sleep(&mut self, duration: Duration) -> io::Result<()> {
        self.sleep_until(Instant::now() + duration).await
    }
}

/// The time one character takes on the wire: start bit, 8 data bits, parity or a second
/// stop bit, stop bit = 11 bits (Modbus over Serial Line V1.02, section 2.5.1).
pub fn char_time(baud: u32) -> Duration {
    Duration::from_nanos(11 * 1_000_000_000 / u64::from(baud.max(1)))
}

/// The inter-frame silence t3.5. Above 19200 baud the spec fixes it at 1.750 ms
/// (Modbus over Serial Line V1.02, section 2.5.1.1).
pub fn t35(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1_750)
    } else {
        char_time(baud) * 7 / 2
    }
}

/// Wire time of `bytes` characters at `baud`.
pub fn wire_time(bytes: usize, baud: u32) -> Duration {
    char_time(baud) * bytes as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t35_is_fixed_above_19200_baud() {
        assert_eq!(t35(115_200), Duration::from_micros(1_750));
        assert_eq!(t35(38_400), Duration::from_micros(1_750));
    }

    #[test]
    fn t35_is_three_and_a_half_characters_at_9600_baud() {
        // 11 bits / 9600 baud = 1.1458 ms per character; x 3.5 = 4.010 ms.
        let t = t35(9_600);
        assert!(
            t > Duration::from_micros(4_000) && t < Duration::from_micros(4_020),
            "{t:?}"
        );
    }

    #[test]
    fn a_ten_register_read_costs_its_documented_wire_time() {
        // DESIGN.md section 5: (8 + 5 + 2N) x 11 / baud, N = 10, 115200 baud = 3.151 ms;
        // with two t3.5 of 1.75 ms that is the 6.65 ms of the physical limit.
        let t = wire_time(8 + 5 + 20, 115_200);
        assert_eq!(t.as_micros(), 3_151);
        assert_eq!((t + 2 * t35(115_200)).as_micros(), 6_651);
    }

    fn learned(lead: &mut Lead, late_us: &[u64]) {
        for &l in late_us {
            lead.learn(Duration::from_micros(l));
        }
    }

    #[test]
    fn the_lead_settles_where_nine_wake_ups_in_ten_are_covered() {
        // Wake-ups 10..=109 us late, evenly: the 90th percentile is about 100 us.
        let mut lead = Lead::new();
        let lateness: Vec<u64> = (0..5_000).map(|i| 10 + (i * 37) % 100).collect();
        learned(&mut lead, &lateness);
        let us = lead.get().as_micros();
        assert!((90..=110).contains(&us), "lead {us} us");
    }

    #[test]
    fn the_lead_shrinks_to_within_a_step_of_a_machine_that_wakes_on_time() {
        // Wake-ups always 3 us late: the lead ends between 3 us and one up-step (9 us)
        // above it, never back at its 50 us start.
        let mut lead = Lead::new();
        learned(&mut lead, &[3; 200]);
        assert!(lead.get() <= Duration::from_micros(12), "{:?}", lead.get());
    }

    #[test]
    fn preemptions_never_push_the_lead_past_its_cap() {
        let mut lead = Lead::new();
        learned(&mut lead, &[5_000; 100]);
        assert_eq!(lead.get(), Duration::from_micros(150));
    }

    #[tokio::test]
    async fn precise_timer_wakes_after_its_deadline() {
        let mut timer = PreciseTimer::new().unwrap();
        let start = Instant::now();
        timer.sleep(Duration::from_micros(1_750)).await.unwrap();
        assert!(start.elapsed() >= Duration::from_micros(1_750));
    }
}
