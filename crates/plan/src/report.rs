//! Plans as a table, as JSON and as a cost-vs-time plot; and the worked example behind Ant's
//! published cost figure.

use crate::search::{frontier, Plan};
use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

fn money(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.2}")
    }
}

/// The top plans as an aligned text table.
pub fn table(plans: &[&Plan], currency: &str) -> String {
    let mut out = format!(
        "{:>3}  {:<28} {:<24} {:>8} {:>14} {:>12} {:>6} {:>9} {:>9}\n",
        "#",
        "devices",
        "layout",
        "days",
        format!("{currency}/1T tok"),
        format!("{currency} total"),
        "MFU",
        "mem free",
        "domestic"
    );
    for (i, p) in plans.iter().enumerate() {
        out.push_str(&format!(
            "{:>3}  {:<28} {:<24} {:>8.1} {:>14} {:>12} {:>5.1}% {:>8.0}% {:>8.0}%\n",
            i + 1,
            p.describe(),
            p.layout_text(),
            p.days,
            money(p.cost_per_trillion),
            money(p.total_cost),
            p.mfu * 100.0,
            p.memory_headroom * 100.0,
            p.domestic_share * 100.0
        ));
    }
    out
}

/// Feasible plans as dots, the Pareto frontier as a line.
pub fn plot_frontier(plans: &[Plan], currency: &str, path: &Path) -> Result<()> {
    if plans.is_empty() {
        return Ok(());
    }
    let front = frontier(plans);
    let (max_days, max_cost) = plans.iter().fold((0.0f64, 0.0f64), |(d, c), p| {
        (d.max(p.days), c.max(p.total_cost))
    });
    nuwa_core::plot::svg(path, (800, 520), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "nuwa plan: cost vs time (feasible plans)",
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..max_days * 1.05, 0f64..max_cost * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("days")
            .y_desc(format!("total cost ({currency})"))
            .draw()?;
        chart.draw_series(
            plans
                .iter()
                .map(|p| Circle::new((p.days, p.total_cost), 2, BLUE.mix(0.3).filled())),
        )?;
        chart
            .draw_series(LineSeries::new(
                front.iter().map(|p| (p.days, p.total_cost)),
                RED.stroke_width(2),
            ))?
            .label("cost-time frontier")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
        nuwa_core::plot::legend(&mut chart)
    })
}
