"""setuptools entry point. The package metadata lives in pyproject.toml; this file maps the package
layout: dipfast/ is the package and the top-level kernels/ folder installs as its subpackage
dipfast.kernels (editable and regular installs alike). Native extensions (csrc/) will be declared here."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["dipfast", "dipfast.*"]), "dipfast.kernels"],
    package_dir={"dipfast.kernels": "kernels"},
)
