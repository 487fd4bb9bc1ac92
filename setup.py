# Only here because CFFI's cffi_modules hook needs setup(); metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
