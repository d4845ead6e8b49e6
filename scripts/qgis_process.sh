#!/usr/bin/env bash
# Run QGIS's headless processing engine with the ChangeScribe plugin visible and enabled.
# Usage: scripts/qgis_process.sh run changescribe:detectchanges -- BEFORE=a.tif AFTER=b.tif OUTPUT=out.gpkg
# It uses an isolated QGIS profile under build/ so a user's own QGIS settings are never touched.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
build="$repo/build/qgis_process"
mkdir -p "$build/plugins" "$build/profile"
ln -sfn "$repo" "$build/plugins/changescribe"
# QGIS 3.22's /usr/bin/qgis_process wrapper passes an option the binary rejects; call the binary.
bin=/usr/bin/qgis_process.bin
[ -x "$bin" ] || bin="$(command -v qgis_process)"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export QGIS_PLUGINPATH="$build/plugins" QGIS_CUSTOM_CONFIG_PATH="$build/profile"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PROJ_DATA="${PROJ_DATA:-/usr/share/proj}"
export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}" XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/runtime-$(id -u)}"
"$bin" plugins enable changescribe >/dev/null 2>&1 || true
exec "$bin" "$@"
