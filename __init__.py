"""ChangeScribe QGIS plugin entry point.

QGIS imports this package at start-up, so it must stay import-light: torch, rasterio and the models are
imported only when the user runs something, and the plugin loads even when they are not installed.
"""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    """Called by QGIS to create the plugin instance."""
    from .plugin.main import ChangeScribePlugin

    return ChangeScribePlugin(iface)
