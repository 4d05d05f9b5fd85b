"""DICOM networking, the service, SEG encoding and the command line of segnode."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segnode")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
