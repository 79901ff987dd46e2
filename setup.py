"""The `sandgate` command's native front (enforcer/cli/sandgate.c), compiled beside
the Python command when the scripts are built; pyproject.toml holds everything else.

Installed: `sandgate` is the native front, which hands `sandgate run --gateway` to a
warm runner without starting Python and runs `sandgate-python` (enforcer/cli/
sandgate-python) for everything else. Where no C compiler works, `sandgate` is a copy
of `sandgate-python` (a line says so): the same command, a Python start slower."""

import os
import shlex
import shutil
import subprocess
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution

# setuptools has no build_scripts of its own to extend: the one it runs (its distutils').
build_scripts = Distribution().get_command_class("build_scripts")

SOURCE = os.path.join("enforcer", "cli", "sandgate.c")
FLAGS = ["-O2", "-Wall", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-fPIE", "-pie"]


class BuildScripts(build_scripts):
    def run(self) -> None:
        super().run()  # sandgate-python, its first line this interpreter (or the wheel's #!python)
        target = os.path.join(self.build_dir, "sandgate")
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        try:
            subprocess.run([*cc, *FLAGS, "-o", target, SOURCE], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"sandgate: no native front ({e}); `sandgate` is the Python command")
            shutil.copy2(os.path.join(self.build_dir, "sandgate-python"), target)


class PlatformDistribution(Distribution):
    """A wheel with a compiled program in it is for this platform only."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_scripts": BuildScripts}, distclass=PlatformDistribution)
