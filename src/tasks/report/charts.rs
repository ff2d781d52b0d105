//! The report's figures, drawn by plotters as inline SVG: axes with labels and a grid, the
//! legend outside the lines, bands for the spread over seeds, markers for chosen epochs.

use plotters::prelude::*;

/// A line, with an optional band (x, low, high) drawn under it and points marked on it.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
    pub marks: Vec<(f64, f64)>,
    pub dashed: bool,
}

pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    /// Fixed ranges (ROC, calibration); `None`: fitted to the data.
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn fitted(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// A line chart as an SVG string (empty when there is nothing to draw). A one-point series is
/// drawn as a point, not an empty frame.
pub fn lines(axes: &Axes, series: &[Series]) -> String {
    if series.iter().all(|s| s.points.is_empty()) {
        return String::new();
    }
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
    });
    let epochs = axes.x == "epoch";
    let x = axes.x_range.unwrap_or_else(|| {
        let (lo, hi) = fitted(xs);
        // Whole epochs from 1, at least two of them, so ticks fall on epochs.
        if epochs {
            (1.0, hi.round().max(2.0))
        } else {
            (lo, hi)
        }
    });
    let y = axes.y_range.unwrap_or_else(|| fitted(ys));
    let mut svg = String::new();
    let error = draw(&mut svg, axes, series, x, y)
        .err()
        .map(|e| e.to_string());
    match error {
        None => svg,
        Some(e) => format!("<p>(figure not drawn: {e})</p>"),
    }
}

fn draw<'s>(
    svg: &'s mut String,
    axes: &Axes,
    series: &[Series],
    x: (f64, f64),
    y: (f64, f64),
) -> Result<(), Box<dyn std::error::Error + 's>> {
    // Room on the right for the legend, so it never covers a line.
    let legend_width = 12 + 7 * series.iter().map(|s| s.name.len()).max().unwrap_or(0) as u32;
    let (w, h) = (480 + legend_width.min(260), 300);
    let root = SVGBackend::with_string(svg, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_horizontally(480);
    let mut chart = ChartBuilder::on(&plot)
        .caption(axes.title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)?;
    // Epochs are whole numbers: label them so.
    let whole = |v: &f64| {
        if axes.x == "epoch" {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let ticks = if axes.x == "epoch" {
        ((x.1 - x.0).round() as usize + 1).clamp(2, 11)
    } else {
        11
    };
    chart
        .configure_mesh()
        .x_desc(axes.x)
        .y_desc(axes.y)
        .x_labels(ticks)
        .x_label_formatter(&whole)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (k, s) in series.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        if !s.band.is_empty() {
            let mut outline: Vec<(f64, f64)> = s.band.iter().map(|b| (b.0, b.2)).collect();
            outline.extend(s.band.iter().rev().map(|b| (b.0, b.1)));
            chart.draw_series(std::iter::once(Polygon::new(
                outline,
                colour.mix(0.18).filled(),
            )))?;
        }
        let style = ShapeStyle {
            color: colour.to_rgba(),
            filled: false,
            stroke_width: 2,
        };
        if s.points.len() == 1 || !s.dashed {
            chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?;
        } else {
            chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 6, 4, style))?;
        }
        chart.draw_series(
            s.points
                .iter()
                .filter(|_| s.points.len() == 1)
                .map(|&p| Circle::new(p, 4, colour.filled())),
        )?;
        chart.draw_series(
            s.marks
                .iter()
                .map(|&p| TriangleMarker::new(p, 6, colour.filled())),
        )?;
    }
    for (k, s) in series.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let y0 = 40 + 18 * k as i32;
        legend.draw(&PathElement::new(
            vec![(4, y0), (22, y0)],
            colour.stroke_width(3),
        ))?;
        legend.draw(&Text::new(s.name.clone(), (28, y0 - 7), ("sans-serif", 12)))?;
    }
    root.present()?;
    Ok(())
}

/// ROC curves, one per class, over the diagonal of chance.
pub fn roc(title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> String {
    let mut series: Vec<Series> = curves
        .iter()
        .filter(|(_, c)| !c.is_empty())
        .map(|(name, c)| Series {
            name: name.clone(),
            points: c.clone(),
            ..Default::default()
        })
        .collect();
    series.push(Series {
        name: "chance".into(),
        points: vec![(0.0, 0.0), (1.0, 1.0)],
        dashed: true,
        ..Default::default()
    });
    lines(
        &Axes {
            title,
            x: "false positive rate (1 - specificity)",
            y: "true positive rate (sensitivity)",
            x_range: Some((0.0, 1.0)),
            y_range: Some((0.0, 1.0)),
        },
        &series,
    )
}

/// A reliability diagram: accuracy against confidence per bin, over the diagonal of perfect
/// calibration.
pub fn reliability(title: &str, bins: &[(f64, f64, usize)]) -> String {
    lines(
        &Axes {
            title,
            x: "confidence (predicted class's probability)",
            y: "accuracy",
            x_range: Some((0.0, 1.0)),
            y_range: Some((0.0, 1.0)),
        },
        &[
            Series {
                name: "model".into(),
                points: bins.iter().map(|b| (b.0, b.1)).collect(),
                marks: bins.iter().map(|b| (b.0, b.1)).collect(),
                ..Default::default()
            },
            Series {
                name: "perfectly calibrated".into(),
                points: vec![(0.0, 0.0), (1.0, 1.0)],
                dashed: true,
                ..Default::default()
            },
        ],
    )
}

/// A colour bar of `stops` (CSS colours from low to high) as SVG.
pub fn colour_bar(stops: &[String]) -> String {
    let gradient: String = stops
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "<stop offset=\"{:.3}\" stop-color=\"{c}\"/>",
                i as f64 / (stops.len() - 1).max(1) as f64
            )
        })
        .collect();
    format!(
        "<svg id=\"colorbar\" width=\"320\" height=\"46\" role=\"img\" aria-label=\"colour bar\"><defs><linearGradient id=\"cmap\">{gradient}</linearGradient></defs><rect x=\"10\" y=\"4\" width=\"300\" height=\"16\" fill=\"url(#cmap)\" stroke=\"#888\"/><text x=\"10\" y=\"38\" font-size=\"12\">0: least weight</text><text x=\"310\" y=\"38\" font-size=\"12\" text-anchor=\"end\">1: most weight (per image)</text></svg>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_have_axes_titles_and_legends() {
        let svg = lines(
            &Axes {
                title: "loss",
                x: "epoch",
                y: "cross-entropy",
                x_range: None,
                y_range: None,
            },
            &[Series {
                name: "train".into(),
                points: vec![(1.0, 1.2), (2.0, 0.9)],
                band: vec![(1.0, 1.1, 1.3), (2.0, 0.8, 1.0)],
                marks: vec![(2.0, 0.9)],
                dashed: false,
            }],
        );
        for part in ["<svg", "epoch", "cross-entropy", "train", "loss"] {
            assert!(svg.contains(part), "{part}");
        }
        let one = lines(
            &Axes {
                title: "t",
                x: "x",
                y: "y",
                x_range: None,
                y_range: None,
            },
            &[Series {
                name: "one".into(),
                points: vec![(1.0, 0.5)],
                ..Default::default()
            }],
        );
        assert!(one.contains("<circle"), "a one-epoch series is a point");
        assert!(lines(
            &Axes {
                title: "t",
                x: "x",
                y: "y",
                x_range: None,
                y_range: None
            },
            &[]
        )
        .is_empty());
    }
}
