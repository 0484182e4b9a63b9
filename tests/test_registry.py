"""The type allowlist: what a config may name, what it may not, and what the errors say."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ptutils import registry
from ptutils.errors import ConfigError, RegistryError
from ptutils.registry import Registry

ALLOWLIST = "torch.nn, torch.optim, ptutils"


@pytest.fixture(autouse=True)
def _isolated_registry():
    """Registrations and `imports:` made by one test never leak into the next."""
    with registry.isolated():
        yield


def write_module(folder: Path, name: str, body: str, marker: Path | None = None) -> Path:
    """A user module file; when `marker` is given, importing it creates that file."""
    head = (
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        if marker
        else ""
    )
    path = folder / f"{name}.py"
    path.write_text(head + textwrap.dedent(body))
    return path


class Net(torch.nn.Module):
    """A user network defined outside the allowlist (module tests.test_registry)."""


class Linear(torch.nn.Module):
    """A user class whose short name collides with torch.nn.Linear."""


def make_net() -> Net:
    return Net()


# --- refused -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("os.system", "module os is not in the allowlist"),
        ("subprocess.Popen", "module subprocess is not in the allowlist"),
        ("builtins.eval", "module builtins is not in the allowlist"),
        ("importlib.import_module", "module importlib is not in the allowlist"),
        ("collections.OrderedDict", "module collections is not in the allowlist"),
        ("torch.load", "module torch is not in the allowlist"),
        ("torch.hub.load", "module torch.hub is not in the allowlist"),
        ("torch.nn.functional.importlib.import_module", "is a module, not a class"),
        ("torch.nn.parallel.distributed.os.system", "is a module, not a class"),
        ("torch.nn.modules.module.OrderedDict", "defined in module collections"),
        ("torch.nn.functional.relu", "not a class"),
        ("torch.nn.Linear.forward", "not a class"),
        ("torch.nn._reduction", "private names"),
        ("torch.nn.Module._apply", "private names"),
        ("torch.nn.Linear.__init__", "private names"),
        ("torch.nn.Linear()", "not a dotted Python name"),
        ("", "non-empty string"),
    ],
)
def test_refused_names_say_why_where_and_how_to_allow(name: str, reason: str) -> None:
    with pytest.raises(RegistryError) as info:
        registry.resolve(name, where="model.optimizer.type")
    message = str(info.value)
    assert reason in message
    assert "`model.optimizer.type`" in message
    assert ALLOWLIST in message
    assert "@ptutils.register" in message and "imports:" in message


@pytest.mark.parametrize("module_name", ["sneaky_marker", "ptutils_marker", "torchnn_marker"])
def test_module_outside_allowlist_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module_name: str
) -> None:
    marker = tmp_path / "imported.txt"
    write_module(tmp_path, module_name, "class Thing:\n    pass\n", marker=marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError, match=f"module {module_name} is not in the allowlist"):
        registry.resolve(f"{module_name}.Thing")
    assert not marker.exists()
    assert module_name not in sys.modules


def test_non_class_objects_and_non_strings_are_refused() -> None:
    with pytest.raises(RegistryError):
        registry.resolve(None)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="register\\(\\) takes a class or a function"):
        registry.register(42)


# --- allowed -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torch.nn.Linear", torch.nn.Linear),
        ("torch.nn.modules.linear.Linear", torch.nn.Linear),
        ("torch.optim.SGD", torch.optim.SGD),
        ("torch.optim.lr_scheduler.StepLR", torch.optim.lr_scheduler.StepLR),
        ("Linear", torch.nn.Linear),
        ("SGD", torch.optim.SGD),
        ("StepLR", torch.optim.lr_scheduler.StepLR),
        ("CrossEntropyLoss", torch.nn.CrossEntropyLoss),
    ],
)
def test_torch_classes_resolve_by_full_and_short_name(name: str, expected: type) -> None:
    assert registry.resolve(name) is expected


def test_resolved_classes_build() -> None:
    net = registry.resolve("torch.nn.Linear")(3, 2)
    optimizer = registry.resolve("SGD")(net.parameters(), lr=0.1)
    scheduler = registry.resolve("torch.optim.lr_scheduler.StepLR")(optimizer, step_size=1)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)


def test_register_allows_a_user_class_by_full_name_short_name_and_alias() -> None:
    full = f"{Net.__module__}.Net"
    with pytest.raises(RegistryError, match="not in the allowlist"):
        registry.resolve(full)
    assert registry.register(Net) is Net
    assert registry.register(name="MyNet")(Net) is Net
    assert registry.resolve(full) is Net
    assert registry.resolve("Net") is Net
    assert registry.resolve("MyNet") is Net
    assert full in registry.known_types() and "MyNet" in registry.known_types()


def test_register_allows_a_function_only_when_registered() -> None:
    full = f"{make_net.__module__}.make_net"
    with pytest.raises(RegistryError):
        registry.resolve(full)
    registry.register(make_net, name="make_net")
    assert registry.resolve(full) is make_net
    assert registry.resolve("make_net") is make_net


def test_alias_bound_to_another_object_is_refused() -> None:
    registry.register(Net, name="Model")
    with pytest.raises(RegistryError, match="already bound"):
        registry.register(Linear, name="Model")
    assert registry.resolve("Model") is Net


def test_ambiguous_short_name_is_an_error_unless_an_alias_decides() -> None:
    registry.register(Linear)
    with pytest.raises(RegistryError, match="ambiguous") as info:
        registry.resolve("Linear")
    assert "torch.nn.Linear" in str(info.value) and f"{Linear.__module__}.Linear" in str(info.value)
    assert registry.resolve("torch.nn.Linear") is torch.nn.Linear
    registry.register(Linear, name="Linear")
    assert registry.resolve("Linear") is Linear


def test_isolated_and_reset_forget_user_registrations() -> None:
    with registry.isolated():
        registry.register(Net, name="ScopedNet")
        assert registry.resolve("ScopedNet") is Net
    with pytest.raises(RegistryError):
        registry.resolve("ScopedNet")
    registry.register(Net, name="ResetNet")
    registry.reset()
    with pytest.raises(RegistryError):
        registry.resolve("ResetNet")
    assert registry.resolve("SGD") is torch.optim.SGD


# --- imports: ------------------------------------------------------------------------
USER_MODULE = """
    import subprocess
    from collections import OrderedDict

    import torch

    class UserNet(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.fc = torch.nn.Linear(width, 1)
"""


def test_a_user_file_is_importable_only_when_listed(tmp_path: Path) -> None:
    marker = tmp_path / "imported.txt"
    write_module(tmp_path, "my_modules", USER_MODULE, marker=marker)
    with pytest.raises(RegistryError, match="not in the allowlist"):
        registry.resolve("my_modules.UserNet", where="model.network.type")
    assert not marker.exists() and "my_modules" not in sys.modules

    assert registry.allow_imports(["./my_modules.py"], base_dir=tmp_path) == ["my_modules"]
    assert marker.exists()
    user_net = registry.resolve("my_modules.UserNet")
    assert isinstance(user_net(width=3).fc, torch.nn.Linear)
    assert "my_modules" in registry.default_registry.prefixes()
    assert "my_modules.UserNet" in registry.known_types()


def test_a_listed_module_allows_only_its_own_classes(tmp_path: Path) -> None:
    write_module(tmp_path, "my_modules", USER_MODULE)
    registry.allow_imports([str(tmp_path / "my_modules.py")])
    for name in ["my_modules.subprocess.Popen", "my_modules.OrderedDict", "my_modules.torch.load"]:
        with pytest.raises(RegistryError):
            registry.resolve(name)


def test_imported_file_is_forgotten_after_the_test(tmp_path: Path) -> None:
    write_module(tmp_path, "scoped_mod", "class Thing:\n    pass\n")
    with registry.isolated():
        registry.allow_imports(["scoped_mod.py"], base_dir=tmp_path)
        assert registry.resolve("scoped_mod.Thing").__name__ == "Thing"
    assert "scoped_mod" not in sys.modules
    with pytest.raises(RegistryError, match="not in the allowlist"):
        registry.resolve("scoped_mod.Thing")


def test_imports_by_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "userpkg_t"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_module(package, "models", USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userpkg_t", raising=False)
    monkeypatch.delitem(sys.modules, "userpkg_t.models", raising=False)
    with pytest.raises(RegistryError):
        registry.resolve("userpkg_t.models.UserNet")
    assert "userpkg_t.models" not in sys.modules
    registry.allow_imports(["userpkg_t.models"])
    assert registry.resolve("userpkg_t.models.UserNet").__module__ == "userpkg_t.models"


def test_missing_imports_name_the_entry_and_the_path_tried(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        registry.allow_imports(["./nope.py"], base_dir=tmp_path)
    assert "./nope.py" in str(info.value) and str(tmp_path / "nope.py") in str(info.value)
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_xyz.models'"):
        registry.allow_imports(["no_such_pkg_xyz.models"])


def test_imports_refuse_the_standard_library_and_shadowing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="standard library"):
        registry.allow_imports(["subprocess"])
    write_module(tmp_path, "json", "class Thing:\n    pass\n")
    with pytest.raises(ConfigError, match="rename the file"):
        registry.allow_imports(["json.py"], base_dir=tmp_path)
    assert sys.modules["json"].__file__ != str(tmp_path / "json.py")


def test_a_failing_user_file_is_a_config_error_and_leaves_no_module(tmp_path: Path) -> None:
    write_module(tmp_path, "broken_mod", "raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="boom"):
        registry.allow_imports(["broken_mod.py"], base_dir=tmp_path)
    assert "broken_mod" not in sys.modules
    with pytest.raises(RegistryError):
        registry.resolve("broken_mod.Thing")


# --- suggestions ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("torch.optim.SDG", "torch.optim.SGD"),
        ("SDG", "SGD"),
        ("torch.nn.Linaer", "torch.nn.Linear"),
        ("torch.optim.lr_scheduler.StepLr", "torch.optim.lr_scheduler.StepLR"),
    ],
)
def test_unknown_names_suggest_the_nearest_valid_ones(typo: str, meant: str) -> None:
    with pytest.raises(RegistryError) as info:
        registry.resolve(typo, where="model.optimizer.type")
    line = next(x for x in str(info.value).splitlines() if "Did you mean" in x)
    assert meant in line.replace(",", " ").replace("?", " ").split()


def test_typos_of_user_types_suggest_them(tmp_path: Path) -> None:
    write_module(tmp_path, "my_modules", USER_MODULE)
    registry.allow_imports(["my_modules.py"], base_dir=tmp_path)
    with pytest.raises(RegistryError, match="Did you mean: my_modules.UserNet"):
        registry.resolve("my_modules.UsrNet")


def test_isolation_keeps_registrations_made_by_ptutils_itself() -> None:
    """A ptutils module first imported inside a test registers once; that must survive."""
    own = Registry()
    library_class = type("LibThing", (), {"__module__": "ptutils.fake_module"})
    with own.isolated():
        own.register(library_class, name="LibAlias")
        own.register(Net, name="UserAlias")
    assert own.resolve("LibAlias") is library_class
    with pytest.raises(RegistryError):
        own.resolve("UserAlias")
    own.reset()
    assert own.resolve("ptutils.fake_module.LibThing") is library_class
    with pytest.raises(RegistryError):
        registry.resolve("LibAlias")
