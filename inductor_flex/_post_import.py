"""Run a function once a module has been imported, without importing it ourselves.

Dynamo and Inductor take over a second to import, and a user who imports inductor_flex for
eager attention or block masks needs neither. Our registrations with them (the capture rule,
the lowerings) only have to be in place before they first trace or lower a graph, and both
import their whole package before doing that. So ``when_imported(name, hook)`` runs
``hook(module)`` right away when ``name`` is already imported, and otherwise right after
``name`` finishes executing, wherever that import happens. (Imported from inside ``name``'s
own import, the hook runs at the first import anywhere after ``name`` finishes.)
"""
import importlib.abc
import sys
import threading
from typing import Callable, Dict, List

_hooks: Dict[str, List[Callable]] = {}
_lock = threading.RLock()


def when_imported(name: str, hook: Callable) -> None:
    """Call ``hook(module)`` once module ``name`` is fully imported (now if it is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None or _is_initializing(module):
            # Not imported yet: the hook runs when it is. Being imported right now (we were
            # imported from inside it): its loader is already running, so the hook runs at
            # the first import anywhere after it finishes.
            _hooks.setdefault(name, []).append(hook)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    hook(module)


def _is_initializing(module) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _run_hooks(name: str, module) -> None:
    with _lock:
        hooks = _hooks.pop(name, [])
    for hook in hooks:
        hook(module)


def _run_hooks_of_finished_modules() -> None:
    with _lock:
        finished = [name for name in _hooks
                    if name in sys.modules and not _is_initializing(sys.modules[name])]
    for name in finished:
        _run_hooks(name, sys.modules[name])


class _HookedLoader(importlib.abc.Loader):
    """The real loader, then the hooks waiting for the module."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _run_hooks(module.__name__, module)

    def __getattr__(self, name):  # get_code, get_source, is_package, ...: the real loader's
        return getattr(self.loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds a hooked module with the other finders, and wraps its loader."""

    def find_spec(self, name, path, target=None):
        _run_hooks_of_finished_modules()
        if name not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HookedLoader(spec.loader)
                return spec
        return None


_FINDER = _PostImportFinder()
