"""osx: export and deployment toolchain for Open-Sora text-to-video models."""

__version__ = "0.1.0"
