//! The release-latency CDF of prereq and of the seed-style strategy, as an SVG.

use crate::Res;

/// Plot both CDFs (log-scale latency) to `path`.
pub fn plot(path: &std::path::Path, prereq: &[f64], seed: &[f64], title: &str) -> Res<()> {
    use plotters::prelude::*;
    const FLOOR_MS: f64 = 0.1;
    let max = prereq
        .iter()
        .chain(seed)
        .copied()
        .fold(1.0, f64::max)
        .max(10.0);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d((FLOOR_MS..max * 1.5).log_scale(), 0.0..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("release latency after the key arrived (ms, log scale)")
        .y_desc("fraction of payments released")
        .x_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .draw()?;
    // A step CDF sampled at 500 quantiles: the file stays small whatever N is.
    let cdf = |v: &[f64]| -> Vec<(f64, f64)> {
        const STEPS: usize = 500;
        let mut pts = vec![(FLOOR_MS, 0.0)];
        if v.is_empty() {
            return pts;
        }
        let mut prev_y = 0.0;
        for j in 1..=STEPS {
            let y = j as f64 / STEPS as f64;
            let idx = ((y * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            let x = v[idx].max(FLOOR_MS);
            pts.push((x, prev_y));
            pts.push((x, y));
            prev_y = y;
        }
        pts
    };
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(230, 120, 20);
    chart
        .draw_series(LineSeries::new(cdf(prereq), blue.stroke_width(2)))?
        .label("prereq (default hold)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(cdf(seed), orange.stroke_width(2)))?
        .label("seed-style (no hold, linear 1 s re-publish)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
