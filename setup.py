"""Thin shim: Dataflow installs the package on workers with --setup_file=./setup.py.

All metadata lives in pyproject.toml.
"""
import setuptools

setuptools.setup()
