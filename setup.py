# The C translator is optional at run time (a pure-Python twin exists), but built by every install.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nodes.mediator._ctranslate",
            sources=["nodes/mediator/_ctranslate.c"],
            extra_compile_args=["-O3"],
        )
    ]
)
