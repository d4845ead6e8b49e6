"""Where the plugin's files are: a leaf module, so every plugin module can import it without an import circle."""

from __future__ import annotations

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent.parent
ICON = str(PLUGIN_DIR / "resources" / "icons" / "changescribe.svg")
