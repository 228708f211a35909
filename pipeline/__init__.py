"""Batch 2x restoration of thumbnails with MIMO-UNet on Ray Data."""

from importlib import metadata

try:
    __version__ = metadata.version("mimo-restore")
except metadata.PackageNotFoundError:  # run from a checkout without installing it
    __version__ = "0+unknown"
