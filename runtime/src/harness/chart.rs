//! The S-LoRA workload's chart: throughput and time-to-first-token p99 against request rate,
//! one line per system, as an SVG (plotters).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One system's measurements: `(request rate, tokens per second, TTFT p99 seconds)` per rate.
pub struct Series<'a> {
    /// The system's name in the legend.
    pub name: &'a str,
    /// Its points, by rate.
    pub points: Vec<(f64, f64, f64)>,
}

/// Writes the two-panel chart to `path`.
pub fn write_svg(path: &Path, series: &[Series<'_>]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::device(format!("drawing {}: {e}", path.display()));
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(480);
    let max_rate = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(1.0, f64::max) * 1.05;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (area, title, pick) in [(&left, "throughput (tok/s)", 1usize), (&right, "TTFT p99 (s)", 2usize)] {
        let value = |p: &(f64, f64, f64)| if pick == 1 { p.1 } else { p.2 };
        let max_y = series.iter().flat_map(|s| s.points.iter().map(value)).fold(1e-3, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..max_rate, 0.0..max_y)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("requests / s").draw().map_err(|e| err(&e))?;
        for (s, color) in series.iter().zip(colors.iter().cycle()) {
            let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, value(p))).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_an_svg_naming_each_system() {
        let path = std::env::temp_dir().join(format!("openlora-chart-{}.svg", std::process::id()));
        let s = [
            Series { name: "openlora", points: vec![(1.0, 100.0, 0.2), (2.0, 190.0, 0.3)] },
            Series { name: "hf-peft", points: vec![(1.0, 30.0, 2.0), (2.0, 31.0, 9.0)] },
        ];
        write_svg(&path, &s).expect("svg");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("<svg") && text.contains("openlora") && text.contains("hf-peft"));
        std::fs::remove_file(&path).ok();
    }
}
