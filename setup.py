"""Which packages install, and from where: everything else is in pyproject.toml.

components/ and pipelines/ sit at the top of the repository (README: layout) and install as
megasft._components and megasft._pipelines, not as two generic top-level names in every
user's site-packages; megasft.pipeline.sources finds them, installed or in a checkout.
pyproject.toml cannot map a folder to a package it does not find, hence this file.
"""

from setuptools import find_namespace_packages, setup

# Namespace discovery, as pyproject's packages.find did: a subpackage without __init__.py
# (megasft.demo) still installs.
PACKAGES = find_namespace_packages(
    "src", include=["megasft", "megasft.*"], exclude=["*.__pycache__"]
)

# configs/ holds YAML only, but setuptools counts any folder of a package as a (namespace) package.
PIPELINE_PACKAGES = ["megasft._components", "megasft._pipelines", "megasft._pipelines.configs"]

setup(
    packages=[*PACKAGES, *PIPELINE_PACKAGES],
    package_dir={
        "": "src",
        "megasft._components": "components",
        "megasft._pipelines": "pipelines",
    },
)
