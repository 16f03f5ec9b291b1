"""Build script for the optional C accelerator of the TCPStore server (rdzv.server._fastpath).

Everything else is configured in pyproject.toml. The extension is optional: where it cannot
be compiled, the install still succeeds and the server runs its pure-Python path
(``rdzv.server.fastpath.AVAILABLE`` tells which; tests/server/test_fastpath.py requires it in CI).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rdzv.server._fastpath",
            ["src/rdzv/server/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ]
)
