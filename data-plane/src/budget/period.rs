//! Budget periods: UTC calendar days, weeks starting Monday, calendar months (DESIGN §18).

use std::fmt;
use std::str::FromStr;
use time::{Date, Duration, Month, OffsetDateTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetPeriod {
    Day,
    Week,
    Month,
}

impl FromStr for BudgetPeriod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "day" => Ok(Self::Day),
            "week" => Ok(Self::Week),
            "month" => Ok(Self::Month),
            other => Err(format!(
                "unknown budget period `{other}` (expected day, week or month)"
            )),
        }
    }
}

impl fmt::Display for BudgetPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        })
    }
}

/// One period: its bounds in unix seconds and its label in counter keys (`day:2026-12-07`,
/// `week:2026-12-07` — the Monday it starts on —, `month:2026-12`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub period: BudgetPeriod,
    pub start_unix: i64,
    pub end_unix: i64,
    pub label: String,
}

fn midnight_unix(date: Date) -> i64 {
    date.midnight().assume_utc().unix_timestamp()
}

impl BudgetPeriod {
    /// The period holding `now_unix`. Times outside the calendar `time` handles (beyond ±9999
    /// years) count as the epoch's period: nothing real runs then.
    pub fn window(self, now_unix: i64) -> Window {
        let date = OffsetDateTime::from_unix_timestamp(now_unix)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
            .date();
        let (start, end, label) = match self {
            Self::Day => (
                date,
                date.next_day(),
                format!(
                    "day:{:04}-{:02}-{:02}",
                    date.year(),
                    u8::from(date.month()),
                    date.day()
                ),
            ),
            Self::Week => {
                let monday =
                    date - Duration::days(i64::from(date.weekday().number_days_from_monday()));
                (
                    monday,
                    monday.checked_add(Duration::days(7)),
                    format!(
                        "week:{:04}-{:02}-{:02}",
                        monday.year(),
                        u8::from(monday.month()),
                        monday.day()
                    ),
                )
            }
            Self::Month => {
                let first = date.replace_day(1).unwrap_or(date);
                let (year, month) = match date.month() {
                    Month::December => (date.year() + 1, Month::January),
                    m => (date.year(), m.next()),
                };
                (
                    first,
                    Date::from_calendar_date(year, month, 1).ok(),
                    format!("month:{:04}-{:02}", date.year(), u8::from(date.month())),
                )
            }
        };
        let start_unix = midnight_unix(start);
        Window {
            period: self,
            start_unix,
            end_unix: end.map_or(i64::MAX, midnight_unix),
            label,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-07T12:00:00Z (a Monday).
    const MON_NOON: i64 = 1_796_644_800;
    const DAY: i64 = 86_400;

    #[test]
    fn days_weeks_and_months_in_utc() {
        let day = BudgetPeriod::Day.window(MON_NOON);
        assert_eq!(day.label, "day:2026-12-07");
        assert_eq!(day.start_unix, MON_NOON - DAY / 2);
        assert_eq!(day.end_unix, MON_NOON + DAY / 2);

        let week = BudgetPeriod::Week.window(MON_NOON + 6 * DAY);
        assert_eq!(week.label, "week:2026-12-07");
        assert_eq!(week.start_unix, MON_NOON - DAY / 2);
        assert_eq!(week.end_unix, MON_NOON - DAY / 2 + 7 * DAY);
        // Sunday night still belongs to the week that started on Monday.
        assert_eq!(
            BudgetPeriod::Week.window(week.end_unix - 1).label,
            "week:2026-12-07"
        );
        assert_eq!(
            BudgetPeriod::Week.window(week.end_unix).label,
            "week:2026-12-14"
        );

        let month = BudgetPeriod::Month.window(MON_NOON);
        assert_eq!(month.label, "month:2026-12");
        assert_eq!(month.start_unix, 1_796_083_200); // 2026-12-01
        assert_eq!(month.end_unix, 1_798_761_600); // 2027-01-01
        assert_eq!(
            BudgetPeriod::Month.window(month.end_unix).label,
            "month:2027-01"
        );
        // February of a leap year.
        let feb = BudgetPeriod::Month.window(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(feb.label, "month:2024-02");
        assert_eq!(feb.end_unix, 1_709_251_200);
    }

    #[test]
    fn parses_and_shows() {
        for p in [BudgetPeriod::Day, BudgetPeriod::Week, BudgetPeriod::Month] {
            assert_eq!(p.to_string().parse::<BudgetPeriod>(), Ok(p));
        }
        assert!("Month".parse::<BudgetPeriod>().is_err());
        assert!("".parse::<BudgetPeriod>().is_err());
    }
}
