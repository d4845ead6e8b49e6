"""Render a run's change regions over a raster with QGIS's own renderer and the plugin's shipped style, to a PNG.

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/render_map.py AFTER.tif RUN.gpkg OUT.png [--before BEFORE.tif]

With ``--before`` the picture is two maps side by side (before | after with the regions), so what changed can be
checked by eye. Used for the README's and docs/'s figures of real pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

STYLE = Path(__file__).resolve().parent.parent / "resources" / "styles" / "change_regions.qml"


def render(layers: list, extent, size: int, out: Path) -> None:
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(layers[-1].crs())
    settings.setExtent(extent)
    settings.setOutputSize(QSize(size, size))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    job.renderedImage().save(str(out))


def draw(args: argparse.Namespace) -> int:
    """The picture; every QGIS object lives in this frame, so none is left when QGIS exits (that crashes)."""
    from qgis.core import QgsRasterLayer, QgsVectorLayer
    from qgis.PyQt.QtGui import QImage, QPainter

    after = QgsRasterLayer(args.after, "after")
    regions = QgsVectorLayer(f"{args.gpkg}|layername=change_regions", "changes", "ogr")
    if not after.isValid() or not regions.isValid():
        print("error: cannot open the raster or the GeoPackage's change_regions layer", file=sys.stderr)
        return 2
    regions.loadNamedStyle(str(STYLE))
    out = Path(args.out)
    render([regions, after], after.extent(), args.size, out)
    if args.before:
        before = QgsRasterLayer(args.before, "before")
        left = out.with_suffix(".before.png")
        render([before], after.extent(), args.size, left)
        both = QImage(2 * args.size + 10, args.size, QImage.Format_ARGB32)
        both.fill(0xFFFFFFFF)
        painter = QPainter(both)
        painter.drawImage(0, 0, QImage(str(left)))
        painter.drawImage(args.size + 10, 0, QImage(str(out)))
        painter.end()
        both.save(str(out))
        left.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("after")
    ap.add_argument("gpkg")
    ap.add_argument("out")
    ap.add_argument("--before")
    ap.add_argument("--size", type=int, default=700)
    args = ap.parse_args(argv)

    from qgis.core import QgsApplication

    QgsApplication.setPrefixPath("/usr", True)
    app = QgsApplication([], False)
    app.initQgis()
    try:
        return draw(args)
    finally:
        app.exitQgis()


if __name__ == "__main__":
    sys.exit(main())
