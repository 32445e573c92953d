//! SVG charts drawn the way every nuwa plot is: a white page, the legend framed in a corner,
//! and a failure to draw reported as one line naming the file.

use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use std::path::Path;

/// What drawing code returns: plotters' errors, boxed.
pub type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Draws an SVG of `size` pixels at `path`; `draw` gets the white page.
pub fn svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Drawn,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, size).into_drawing_area();
    let drawn = (|| -> Drawn {
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    drawn.map_err(|e| anyhow::anyhow!("{}: cannot draw plot: {e}", path.display()))
}

/// The chart's series labels, framed, in its corner.
pub fn legend<'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, SVGBackend<'a>, CT>) -> Drawn {
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}
