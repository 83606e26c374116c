//! The figures of a run: the JSON line printed last, and percentiles.

use std::fmt::Write as _;

/// Every figure, in the order set.
#[derive(Default)]
pub struct Figures(Vec<(String, serde_json::Value)>);

impl Figures {
    /// A figure of any JSON type.
    pub fn set(&mut self, name: &str, v: impl Into<serde_json::Value>) {
        self.0.push((name.to_owned(), v.into()));
    }

    /// A number rounded to `decimals` (`null` when not finite).
    pub fn num(&mut self, name: &str, v: f64, decimals: i32) {
        let scale = 10f64.powi(decimals);
        let v = (v * scale).round() / scale;
        self.set(
            name,
            serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into),
        );
    }

    /// One JSON object, keys in the order set.
    pub fn json(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}:{v}", serde_json::Value::from(k.as_str()));
        }
        out.push('}');
        out
    }
}

/// The `p`-th percentile (nearest rank) of sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
