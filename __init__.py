"""sitiancal: per-pixel calibration of the SiTian CMOS camera network.

Layers (imports point down only)::

    api/      FastAPI application
    service/  settings, jobs, pipeline orchestration, CLI
    storage/  catalog, product store, FITS scanning and frame cubes
    compute/  pure numpy kernels, dask graph builders, simulator
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sitiancal")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
