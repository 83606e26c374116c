//! The human-readable table printed before the JSON line.

/// Rows of (what, figure), in order.
#[derive(Default)]
pub struct Table(Vec<(String, String)>);

impl Table {
    /// Add a row.
    pub fn row(&mut self, what: &str, figure: String) {
        self.0.push((what.to_owned(), figure));
    }

    /// Print the table under a title.
    pub fn print(&self, title: &str) {
        let width = self
            .0
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        println!();
        println!("{title}");
        println!("{}", "-".repeat(width + 40));
        for (k, v) in &self.0 {
            println!("{k:<width$}  {v}");
        }
        println!("{}", "-".repeat(width + 40));
    }
}
