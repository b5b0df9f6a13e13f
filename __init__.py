"""ComfyUI entry point of the SALAD node pack (sparse + gated linear attention for Wan2.1).

ComfyUI loads this folder as ``custom_nodes/<any name>/`` and calls ``comfy_entrypoint()``
(V3 API). The pack's own libraries, ``salad_core`` and ``kernels``, are imported as top-level
packages, so this file puts the pack folder on ``sys.path`` first and checks that those names
really resolve to this pack (another package of the same name would shadow them). The node
classes live in ``nodes/`` and are imported relatively: ComfyUI has a top-level ``nodes``
module of its own, so ``import nodes`` would never mean this pack's folder.

Nothing here touches a GPU or prints; messages go to the ``salad`` logger.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

log = logging.getLogger("salad")

PACK_DIR = os.path.dirname(os.path.realpath(__file__))
TOP_LEVEL_PACKAGES = ("kernels", "salad_core")
MODEL_FOLDER = "salad"
MODEL_EXTENSIONS = {".safetensors"}


def _inside_pack(path: str | None) -> bool:
    if not path:
        return False
    real = os.path.realpath(path)
    return real == PACK_DIR or real.startswith(PACK_DIR + os.sep)


def _ensure_pack_importable() -> None:
    """Make ``salad_core`` and ``kernels`` importable from this pack, or raise ImportError."""
    if PACK_DIR not in {os.path.realpath(p) for p in sys.path if p}:
        sys.path.insert(0, PACK_DIR)
    for name in TOP_LEVEL_PACKAGES:
        module = importlib.import_module(name)
        where = getattr(module, "__file__", None)
        if not _inside_pack(where):
            raise ImportError(
                f"SALAD: Expected the top-level package '{name}' to come from this node pack "
                f"({PACK_DIR}), got {where or 'a namespace package'}. Another installed package "
                f"or custom node also provides '{name}' and was imported first. Try uninstalling "
                f"or renaming that package (e.g. `pip uninstall {name}` if it is a pip package), "
                f"or disabling the custom node that ships it, then restart ComfyUI."
            )


def _register_model_folder() -> None:
    """``models/salad`` for SALAD weights files (.safetensors), kept if already configured."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    if MODEL_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[MODEL_FOLDER]
        if default not in paths:
            paths.append(default)
        exts = set(exts) | MODEL_EXTENSIONS if exts else set(MODEL_EXTENSIONS)
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, exts)
    else:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], set(MODEL_EXTENSIONS))
    folder_paths.filename_list_cache.pop(MODEL_FOLDER, None)


async def comfy_entrypoint():
    """Called by ComfyUI. Everything ComfyUI-specific happens here, not at import: test
    runners (pytest collects the pack root as a package) and tools can import this module
    without ComfyUI."""
    _ensure_pack_importable()
    _register_model_folder()
    from comfy_api.latest import ComfyExtension

    from .nodes import NODE_LIST

    class SaladExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODE_LIST)

    return SaladExtension()


__all__ = ["comfy_entrypoint"]
