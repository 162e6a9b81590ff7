//! The simulator's figure: each mode's TTFT distribution (a CDF on a log time
//! axis) beside its prefix hit rate (bars), drawn with `plotters` into an SVG
//! string so `kvrouter sim --plot` needs no font files or image libraries.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::ModeReport;

/// A drawing error (the SVG backend writes to memory, so this means a bug).
pub type PlotError = Box<dyn std::error::Error + Send + Sync>;

/// Category colours, one per mode in run order.
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A CDF is drawn from at most this many points per mode: enough for a smooth
/// line, small enough to keep the file light on 10^5-request traces.
const CDF_POINTS: usize = 400;

fn color(k: usize) -> RGBColor {
    COLORS[k % COLORS.len()]
}

/// TTFT CDFs per mode (log time axis) and prefix-hit-rate bars, as SVG.
pub fn svg(reports: &[ModeReport], title: &str) -> Result<String, PlotError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 16))?;
        let (left, right) = root.split_horizontally(620);
        cdf(&left, reports)?;
        bars(&right, reports)?;
        root.present()?;
    }
    Ok(out)
}

/// The log-axis range covering every mode's TTFTs, in whole decades of ms.
fn decades(reports: &[ModeReport]) -> (f64, f64) {
    let positive = reports
        .iter()
        .flat_map(|r| r.ttft_sorted_ms.iter().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = positive.fold((f64::INFINITY, 1.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    let lo = 10f64.powf(lo.max(0.1).log10().floor());
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
    (lo, hi)
}

fn cdf(area: &DrawingArea<SVGBackend<'_>, Shift>, reports: &[ModeReport]) -> Result<(), PlotError> {
    let (lo, hi) = decades(reports);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("time to first token (log)")
        .y_desc("fraction of requests")
        .x_label_formatter(&|ms| {
            if *ms >= 1000.0 {
                format!("{}s", ms / 1000.0)
            } else {
                format!("{ms}ms")
            }
        })
        .y_labels(5)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (k, r) in reports.iter().enumerate() {
        let n = r.ttft_sorted_ms.len();
        if n == 0 {
            continue;
        }
        let step = (n / CDF_POINTS).max(1);
        let points = (0..n)
            .step_by(step)
            .chain([n - 1])
            .map(|i| (r.ttft_sorted_ms[i].max(lo), (i + 1) as f64 / n as f64));
        let c = color(k);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(r.mode.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    reports: &[ModeReport],
) -> Result<(), PlotError> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption("prefix hit rate", ("sans-serif", 13))
        .x_label_area_size(70)
        .y_label_area_size(40)
        .build_cartesian_2d((0..reports.len().max(1)).into_segmented(), 0f64..1.1f64)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
        .x_labels(reports.len().max(1))
        .x_label_style(
            ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(k) | SegmentValue::Exact(k) => {
                reports.get(*k).map(|r| r.mode.clone()).unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    chart.draw_series(reports.iter().enumerate().map(|(k, r)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(k), 0.0),
                (SegmentValue::Exact(k + 1), r.hit_rate),
            ],
            color(k).filled(),
        );
        bar.set_margin(0, 0, 6, 6);
        bar
    }))?;
    chart.draw_series(reports.iter().enumerate().map(|(k, r)| {
        Text::new(
            format!("{:.1}%", r.hit_rate * 100.0),
            (SegmentValue::CenterOf(k), r.hit_rate + 0.03),
            TextStyle::from(("sans-serif", 10).into_font())
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(mode: &str, hit_rate: f64, ttft_sorted_ms: Vec<f64>) -> ModeReport {
        ModeReport {
            mode: mode.into(),
            requests: ttft_sorted_ms.len(),
            ttft_p50_ms: None,
            ttft_p90_ms: None,
            ttft_p99_ms: None,
            itl_p50_ms: None,
            itl_p90_ms: None,
            e2e_p50_ms: None,
            e2e_p90_ms: None,
            e2e_p99_ms: None,
            output_tokens_per_s: None,
            requests_per_s: None,
            hit_rate,
            load_spread: None,
            preemptions: 0,
            kv_event_errors: 0,
            ttft_sorted_ms,
        }
    }

    #[test]
    fn draws_every_mode_and_its_hit_rate() {
        let reports = [
            report("round-robin", 0.25, vec![5.0, 50.0, 900.0, 4000.0]),
            report("kv", 0.625, vec![3.0, 8.0, 20.0]),
        ];
        let s = svg(&reports, "two <modes>").unwrap();
        assert!(s.starts_with("<svg"), "{s:.80}");
        assert!(s.contains("two &lt;modes&gt;"));
        for label in ["round-robin", "kv", "25.0%", "62.5%", "1s", "10ms"] {
            assert!(s.contains(label), "{label} missing");
        }
        assert_eq!(
            s.matches(r#"stroke-width="2""#).count(),
            2,
            "one CDF line per mode"
        );
    }

    #[test]
    fn an_empty_run_still_draws() {
        assert!(svg(&[], "nothing").unwrap().contains("prefix hit rate"));
    }
}
