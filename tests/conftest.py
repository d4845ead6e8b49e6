"""Shared fixtures: a real headless QgsApplication, GeoTIFF writers, and an oracle change model.

Every test runs with real GDAL/rasterio/QGIS/torch on real files under pytest's tmp_path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp/runtime-" + str(os.getuid()))
# exported ONNX graphs (core.onnx_export) go to the build folder, not the per-user cache of whoever runs the tests
os.environ.setdefault("CHANGESCRIBE_CACHE_DIR", str(Path(__file__).resolve().parent.parent / "build" / "test-cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rasterio  # noqa: E402
import torch  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

from changescribe.core.model_api import ChangeModel, InputSpec  # noqa: E402


@pytest.fixture(scope="session")
def qgis_app():
    """One QgsApplication for the session, with Processing and the plugin's provider registered."""
    from qgis.core import QgsApplication

    app = QgsApplication.instance()
    if app is None:
        QgsApplication.setPrefixPath("/usr", True)
        app = QgsApplication([], False)
        app.initQgis()
    sys.path.insert(0, "/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing

    Processing.initialize()
    from changescribe.plugin.provider import ChangeScribeProvider

    registry = QgsApplication.processingRegistry()
    if registry.providerById("changescribe") is None:
        registry.addProvider(ChangeScribeProvider())
    yield app


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[str, str]:
    """The shipped sample pair, copied: QGIS writes .aux.xml statistics beside rasters it opens."""
    import shutil

    root = tmp_path_factory.mktemp("sample")
    for name in ("sample_before.tif", "sample_after.tif"):
        shutil.copyfile(REPO / "resources" / "sample" / name, root / name)
    return str(root / "sample_before.tif"), str(root / "sample_after.tif")


def write_geotiff(path: Path, data: np.ndarray, crs: str = "EPSG:32633",
                  transform=None, nodata: float | None = None) -> Path:
    """A real GeoTIFF on disk from a (bands, H, W) array."""
    transform = transform or from_origin(500000.0, 5000000.0, 0.5, 0.5)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as ds:
        ds.write(data)
    return path


class OracleModel(ChangeModel):
    """A per-pixel change rule with no context: any tiling must reproduce the untiled result exactly.

    Used only to test tiling and blending; real runs use trained models.
    """

    name = "oracle"
    version = "test"

    def __init__(self, tile_size: int = 64):
        self.input_spec = InputSpec(tile_size=tile_size, gsd=None)

    @property
    def can_caption(self) -> bool:
        return False

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        diff = (after - before).abs().mean(dim=1)
        return torch.sigmoid((diff - 40.0) / 8.0)


@pytest.fixture
def oracle() -> OracleModel:
    return OracleModel()


def oracle_probability(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The oracle on whole arrays, computed without any tiling."""
    b = torch.from_numpy(before.astype(np.float32))[None]
    a = torch.from_numpy(after.astype(np.float32))[None]
    return OracleModel().change_probability(b, a)[0].numpy()


def block_pair(size: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured pair with rectangles that change; returns before, after, true mask."""
    rng = np.random.default_rng(seed)
    before = rng.integers(60, 120, size=(3, size, size)).astype(np.uint8)
    after = before.copy()
    mask = np.zeros((size, size), np.uint8)
    for _ in range(6):
        h, w = rng.integers(max(2, size // 25), max(3, size // 7), size=2)
        r, c = rng.integers(0, size - max(h, w), size=2)
        after[:, r:r + h, c:c + w] = 230
        mask[r:r + h, c:c + w] = 1
    return before, after, mask
