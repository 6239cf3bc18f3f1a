"""Stand-ins for the eight packages USB imports but its CIFAR FixMatch and MixMatch never call.

`semilearn/__init__.py` imports every algorithm, network, data set and hook, and with them packages for text,
speech, medical images, ViTs and experiment trackers:

| name         | imported by (semilearn/, USB 1ef4cbeb)                                  | used for            |
|--------------|-------------------------------------------------------------------------|---------------------|
| skimage      | datasets/cv_datasets/medmnist.py:16                                     | MedMNIST montages   |
| torchaudio   | datasets/audio_datasets/datasetbase.py:7                                | audio augmentation  |
| timm         | nets/vit/vit.py:12-13                                                   | ViT layers          |
| transformers | nets/{bert,hubert,wave2vecv2,dinov2}, datasets/collactors/*_collactor.py | text/speech models  |
| ruamel.yaml  | core/utils/misc.py:7                                                    | train.py's --c YAML |
| wandb        | core/hooks/wandb.py:5                                                   | use_wandb=True      |
| aim          | core/hooks/aim.py:5                                                     | use_aim=True        |
| progress     | lighting/trainer.py:8, imb_algorithms/cossl/utils.py:13                 | progress bars       |

None is a dependency of this project. After `install()` (the entry's process) or inside `installed()` (tests), a
meta-path finder placed first answers the import of exactly these names and their submodules (whether or not the
real package is installed, so that every machine runs the same code) with a module whose every attribute is a
StandIn: `from transformers import BertModel` binds one, which a type annotation or a `Union[...]` at import time
may hold. Any use of a StandIn (a call, an attribute, setting one, iterating, its truth value, subclassing it)
raises ImportError naming the module and is recorded in `used`: each USB result lists it (usb_stand_ins_used), and
an empty list is the evidence that none of them was used.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types

NAMES = ("skimage", "torchaudio", "timm", "transformers", "ruamel.yaml", "wandb", "aim", "progress")
# `import ruamel.yaml` first imports the package `ruamel` (a namespace package of the real distribution): a bare
# package is made for it, holding nothing but the submodule.
PARENTS = ("ruamel",)
used: list[str] = []  # "module.attribute: what was done", in order; empty after a run that called none of them


def _standing_in_for(fullname: str) -> str | None:
    """The stood-in name `fullname` is or is inside, if any."""
    for name in NAMES:
        if fullname == name or fullname.startswith(name + "."):
            return name
    return None


def _refuse(what: str, action: str):
    used.append(f"{what}: {action}")
    top = _standing_in_for(what) or what
    raise ImportError(f"{what} is a stand-in: USB imports {top}, which the fixmatch-bench adapter does not "
                      f"install because the code it runs never uses it; something did ({action})",
                      name=top)


class StandIn:
    """What `from MODULE import NAME` binds: any use raises ImportError naming MODULE.NAME."""

    __slots__ = ("_what",)

    def __init__(self, what: str):
        object.__setattr__(self, "_what", what)

    def __repr__(self) -> str:
        return f"<stand-in for {object.__getattribute__(self, '_what')}>"

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):  # protocol probes (copy, pickle, typing): absent
            raise AttributeError(attr)
        _refuse(object.__getattribute__(self, "_what"), f"attribute {attr!r}")

    def __setattr__(self, attr, value):
        _refuse(object.__getattribute__(self, "_what"), f"set {attr!r}")

    def __call__(self, *args, **kwargs):
        _refuse(object.__getattribute__(self, "_what"), "called")

    def __iter__(self):
        _refuse(object.__getattribute__(self, "_what"), "iterated")

    def __bool__(self):
        _refuse(object.__getattribute__(self, "_what"), "truth value")

    def __mro_entries__(self, bases):
        _refuse(object.__getattribute__(self, "_what"), "subclassed")


class StandInModule(types.ModuleType):
    """A stood-in module: every public attribute is a StandIn (so that `from M import X` succeeds)."""

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return StandIn(f"{self.__name__}.{attr}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        if spec.name in PARENTS:
            return types.ModuleType(spec.name)
        return StandInModule(spec.name)

    def exec_module(self, module) -> None:
        module.__stand_in__ = True


class StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if _standing_in_for(fullname) is None and fullname not in PARENTS:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        spec.submodule_search_locations = []  # a package: its submodules are stood in for too
        return spec


def _ours(fullname: str) -> bool:
    return _standing_in_for(fullname) is not None or fullname in PARENTS


def install() -> StandInFinder:
    """From now on in this process (an entry's: it ends with the run), the eight names and their submodules import
    as stand-ins; real ones already imported are dropped from sys.modules."""
    for name in [n for n in sys.modules if _ours(n)]:
        del sys.modules[name]
    finder = StandInFinder()
    sys.meta_path.insert(0, finder)
    return finder


@contextlib.contextmanager
def installed():
    """install() for a while (tests): afterwards the finder and the stand-ins are gone and real modules that had
    been imported are back."""
    saved = {name: module for name, module in sys.modules.items() if _ours(name)}
    finder = install()
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
