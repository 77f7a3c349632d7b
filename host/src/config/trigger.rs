//! The parts of an incremental-learning job's configuration that are small languages of their
//! own: the daily time window a round may start in (`"22:00-06:00"`, wrapping midnight) and the
//! conditions a new model version must meet to be deployed (`"accuracy_delta >= 0.01"`).
use std::fmt;

use serde::{Deserialize, Serialize};

/// A daily window `HH:MM-HH:MM` in the edge's local time: from the start (included) to the end
/// (excluded); a start later than the end wraps midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DailyWindow {
    /// Minutes after midnight.
    pub start: u16,
    pub end: u16,
}

fn minutes(text: &str) -> Option<u16> {
    let (h, m) = text.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl TryFrom<String> for DailyWindow {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a daily window HH:MM-HH:MM (e.g. \"22:00-06:00\")");
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!("`{text}`: the window is empty (its start is its end)"));
        }
        Ok(DailyWindow { start, end })
    }
}

impl From<DailyWindow> for String {
    fn from(w: DailyWindow) -> String {
        w.to_string()
    }
}

impl fmt::Display for DailyWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}-{:02}:{:02}", self.start / 60, self.start % 60, self.end / 60, self.end % 60)
    }
}

impl DailyWindow {
    /// Whether `minute` (after midnight) is inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// What a deploy condition compares: the new version's accuracy and loss on the eval set, and
/// their differences to the serving version's (new minus serving).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    Accuracy,
    AccuracyDelta,
    Loss,
    LossDelta,
}

impl Measure {
    const ALL: [(&'static str, Measure); 4] = [
        ("accuracy_delta", Measure::AccuracyDelta),
        ("accuracy", Measure::Accuracy),
        ("loss_delta", Measure::LossDelta),
        ("loss", Measure::Loss),
    ];

    fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, m)| *m == self).map_or("?", |(n, _)| n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    AtLeast,
    Above,
    AtMost,
    Below,
}

impl Comparison {
    const ALL: [(&'static str, Comparison); 4] =
        [(">=", Comparison::AtLeast), ("<=", Comparison::AtMost), (">", Comparison::Above), ("<", Comparison::Below)];

    fn symbol(self) -> &'static str {
        Self::ALL.iter().find(|(_, c)| *c == self).map_or("?", |(s, _)| s)
    }
}

/// `<measure> <op> <number>`, e.g. `accuracy_delta >= 0.01`; measures `accuracy`,
/// `accuracy_delta`, `loss`, `loss_delta`; operators `>=`, `>`, `<=`, `<`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    measure: Measure,
    comparison: Comparison,
    threshold: f64,
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Condition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Condition {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (name, measure) =
            Measure::ALL.iter().find(|(n, _)| t.starts_with(n)).copied().ok_or_else(|| {
                format!("`{text}`: a condition starts with accuracy, accuracy_delta, loss or loss_delta")
            })?;
        let rest = t[name.len()..].trim_start();
        let (symbol, comparison) = Comparison::ALL
            .iter()
            .find(|(s, _)| rest.starts_with(s))
            .copied()
            .ok_or_else(|| format!("`{text}`: after `{name}` comes one of >=, >, <=, <"))?;
        let number = rest[symbol.len()..].trim();
        let threshold: f64 = number
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| format!("`{text}`: `{number}` is not a number"))?;
        Ok(Condition { measure, comparison, threshold })
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.measure.name(), self.comparison.symbol(), self.threshold)
    }
}

/// A new version's measures on the eval set, and the serving version's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub accuracy: f64,
    pub loss: f64,
    pub serving_accuracy: f64,
    pub serving_loss: f64,
}

impl Measured {
    fn value(&self, m: Measure) -> f64 {
        match m {
            Measure::Accuracy => self.accuracy,
            Measure::AccuracyDelta => self.accuracy - self.serving_accuracy,
            Measure::Loss => self.loss,
            Measure::LossDelta => self.loss - self.serving_loss,
        }
    }
}

impl Condition {
    /// Whether the condition holds, and the reason in words (`accuracy_delta 0.0312 >= 0.01`).
    pub fn check(&self, m: &Measured) -> (bool, String) {
        let v = m.value(self.measure);
        let holds = match self.comparison {
            Comparison::AtLeast => v >= self.threshold,
            Comparison::Above => v > self.threshold,
            Comparison::AtMost => v <= self.threshold,
            Comparison::Below => v < self.threshold,
        };
        let verdict = if holds { "holds" } else { "fails" };
        (holds, format!("{} = {v:.4}: `{self}` {verdict}", self.measure.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(text: &str) -> DailyWindow {
        DailyWindow::try_from(text.to_string()).expect(text)
    }

    #[test]
    fn a_window_wrapping_midnight_holds_late_evening_and_early_morning() {
        let night = window("22:00-06:00");
        let at = |h: u16, m: u16| night.contains(h * 60 + m);
        assert!(at(22, 0) && at(23, 59) && at(0, 0) && at(3, 30) && at(5, 59));
        assert!(!at(6, 0) && !at(12, 0) && !at(21, 59));
        let day = window("09:15-17:00");
        assert!(day.contains(9 * 60 + 15) && day.contains(16 * 60 + 59));
        assert!(!day.contains(17 * 60) && !day.contains(9 * 60 + 14) && !day.contains(23 * 60));
        assert_eq!(night.to_string(), "22:00-06:00");
        for bad in ["22:00", "24:00-01:00", "10:60-11:00", "1:00-2:00", "08:00-08:00", "aa:bb-cc:dd"] {
            assert!(DailyWindow::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn deploy_conditions_parse_and_compare_new_against_serving() {
        let m = Measured { accuracy: 0.93, loss: 0.3, serving_accuracy: 0.90, serving_loss: 0.4 };
        let c: Condition = "accuracy_delta >= 0.01".parse().expect("parses");
        assert_eq!(c.to_string(), "accuracy_delta >= 0.01");
        let (holds, why) = c.check(&m);
        assert!(holds, "{why}");
        assert!(why.contains("0.0300"), "{why}");
        assert!(!"accuracy_delta >= 0.05".parse::<Condition>().expect("parses").check(&m).0);
        assert!("loss_delta < 0".parse::<Condition>().expect("parses").check(&m).0);
        assert!("accuracy>0.9".parse::<Condition>().expect("parses").check(&m).0);
        assert!(!"loss <= 0.2".parse::<Condition>().expect("parses").check(&m).0);
        for bad in ["precision >= 1", "accuracy == 1", "accuracy >= x", "accuracy >= NaN", "accuracy"] {
            assert!(bad.parse::<Condition>().is_err(), "{bad}");
        }
    }
}
