//! A read-only MC146818 CMOS real-time clock at ports 0x70/0x71, so that a guest without
//! kvm-clock (the compat profile boots an SMP guest with `nopv`) starts with the host's
//! wall-clock time instead of 1970. The guest cannot set it: writes to the time registers are
//! ignored.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

/// Index port; the data port follows it.
pub const RTC_BASE: u16 = 0x70;
/// Index and data port.
pub const RTC_LEN: u16 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Status A: 32.768 kHz time base, 1024 Hz rate, no update in progress.
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode, BCD values.
const STATUS_B: u8 = 0x02;
/// Status D: the clock's battery and RAM are valid.
const STATUS_D: u8 = 0x80;

/// The CMOS RTC, reading the host clock (UTC) on every access.
#[derive(Debug, Default)]
pub struct Rtc {
    index: u8,
}

/// A UTC calendar time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    /// Full year.
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 1 (Sunday) ..= 7, as the RTC counts.
    pub weekday: u32,
}

/// Converts seconds since the Unix epoch to a UTC calendar time (proleptic Gregorian).
pub fn civil_from_unix(secs: u64) -> CivilTime {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Days since 0000-03-01, in 400-year eras of 146097 days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    CivilTime {
        year: year as u32,
        month: month as u32,
        day: day as u32,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday (5 when Sunday is 1).
        weekday: ((days + 4) % 7 + 1) as u32,
    }
}

fn bcd(v: u32) -> u8 {
    let v = (v % 100) as u8;
    ((v / 10) << 4) | (v % 10)
}

impl Rtc {
    fn register(&self, now: &CivilTime) -> u8 {
        match self.index {
            REG_SECONDS => bcd(now.second),
            REG_MINUTES => bcd(now.minute),
            REG_HOURS => bcd(now.hour),
            REG_WEEKDAY => bcd(now.weekday),
            REG_DAY => bcd(now.day),
            REG_MONTH => bcd(now.month),
            REG_YEAR => bcd(now.year % 100),
            REG_CENTURY => bcd(now.year / 100),
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D,
            _ => 0,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            1 => {
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                self.register(&civil_from_unix(secs))
            }
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&v)) = (offset, data.first()) {
            // Bit 7 of the index port masks NMIs on real hardware.
            self.index = v & 0x7f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_matches_known_dates() {
        assert_eq!(
            civil_from_unix(0),
            CivilTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        assert_eq!(
            civil_from_unix(951_827_696),
            CivilTime {
                year: 2000,
                month: 2,
                day: 29,
                hour: 12,
                minute: 34,
                second: 56,
                weekday: 3
            }
        );
        // 2026-11-28 00:00:00 UTC, a Saturday.
        let t = civil_from_unix(1_795_824_000);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2026, 11, 28, 7));
    }

    #[test]
    fn registers_read_as_bcd_through_the_index_port() {
        let mut rtc = Rtc::default();
        let now = civil_from_unix(951_827_696);
        rtc.write(0, &[0x80 | REG_MINUTES]);
        assert_eq!(rtc.register(&now), 0x34);
        rtc.index = REG_CENTURY;
        assert_eq!(rtc.register(&now), 0x20);
        rtc.index = REG_STATUS_B;
        assert_eq!(rtc.register(&now), STATUS_B);
        let mut b = [0u8; 1];
        rtc.read(0, &mut b);
        assert_eq!(b, [0xff], "the index port is write-only");
    }
}
