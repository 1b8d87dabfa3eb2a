"""``info`` and ``cache clear``: the versions in use, the GPU and the label cache; the cache emptied."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from pathlib import Path

from ..config.job_config import AnnotationConfig


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="the label cache (annotation.cache_dir; default: $LACY_CACHE_DIR/labels "
                                            "or ~/.cache/lacy-stream/labels)")


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    add_cache_arguments(parser)
    parser.add_argument("--spacy-model", default=AnnotationConfig.spacy_model, help="the spaCy model to look for")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_info(args: argparse.Namespace) -> int:
    info = environment_info(args.spacy_model, _cache_dir(args))
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for name, value in info.items():
            print(f"{name:<{width}}  {value}")
    return 0


def environment_info(spacy_model: str, cache_dir: Path) -> dict[str, str]:
    """What a bug report needs: versions, the accelerator, the spaCy model and the label cache."""
    import torch

    from ..annotate.label_cache import cache_namespaces, directory_bytes

    namespaces = cache_namespaces(cache_dir)
    if namespaces:
        cache = f"{cache_dir}: {_size(sum(map(directory_bytes, namespaces)))} in {_namespaces(len(namespaces))}"
    else:
        cache = f"{cache_dir}: {'empty' if cache_dir.is_dir() else 'does not exist yet'}"
    return {
        "lacy-stream": _version("lacy-stream"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda or "none (a CPU build of torch)",
        "triton": _version("triton"),
        "GPU": ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())) or "none",
        "spaCy": _version("spacy"),
        "spaCy model": _spacy_model_version(spacy_model),
        "transformers": _version("transformers"),
        "label cache": cache,
    }


def run_cache_clear(args: argparse.Namespace) -> int:
    from ..annotate.label_cache import clear_cache

    cache_dir = _cache_dir(args)
    namespaces, freed = clear_cache(cache_dir)
    if namespaces:
        print(f"deleted {_namespaces(namespaces)} ({_size(freed)}) of the label cache {cache_dir}")
    else:
        print(f"nothing to delete: the label cache {cache_dir} {'is empty' if cache_dir.is_dir() else 'does not exist'}")
    return 0


def _cache_dir(args: argparse.Namespace) -> Path:
    from ..annotate.label_cache import default_cache_dir

    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _spacy_model_version(model: str) -> str:
    from spacy.util import get_model_meta, get_package_version

    from ..annotate.spacy_pipeline import resolve_model

    try:
        source = resolve_model(model)
    except OSError as error:
        return str(error)
    version = get_model_meta(source)["version"] if isinstance(source, Path) else get_package_version(source)
    return f"{source} {version}"


def _namespaces(count: int) -> str:
    return f"{count} namespace{'s' * (count != 1)}"


def _size(size: int) -> str:
    """``512 bytes``, ``12.3 kB``, ``4.5 MB`` or ``1.2 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
