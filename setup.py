"""Build hook: the wheel ships ``studies/*.toml`` as ``ablate/study/studies/`` (``studies/`` stays the only source).

Everything else about the package is in ``pyproject.toml``. An editable install reads ``studies/`` from the
checkout instead (``ablate.study.spaces.SPACES_DIR``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SPACES_SOURCE = Path("studies")
SPACES_TARGET = Path("ablate", "study", "studies")


class BuildPyWithSpaces(build_py):
    """``build_py`` that also copies the space files into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib, SPACES_TARGET)
        self.mkpath(str(target))
        for source in _space_files():
            self.copy_file(str(source), str(target / source.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(Path(self.build_lib, SPACES_TARGET, source.name)) for source in _space_files()]

    def get_source_files(self) -> list[str]:
        # The sdist takes its files from here: without the spaces a wheel built from it would ship none.
        return super().get_source_files() + [str(source) for source in _space_files()]


def _space_files() -> list[Path]:
    return sorted(SPACES_SOURCE.glob("*.toml"))


setup(cmdclass={"build_py": BuildPyWithSpaces})
