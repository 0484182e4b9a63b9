"""The type allowlist: what a config may name, what it may not, and what the errors say."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ptutils import policy, registry
from ptutils.errors import ConfigError, RegistryError
from ptutils.policy import Policy
from ptutils.registry import Registry
from ptutils.sources import SourceFile

ALLOWLIST = "torch.nn, torch.optim, ptutils.nets, ptutils.data, ptutils.callbacks, ptutils.model"


@pytest.fixture(autouse=True)
def _isolated_registry():
    """Registrations and `imports:` made by one test never leak into the next, and the
    operator policy is the strict default whatever the environment says."""
    previous = policy.configure(Policy())
    try:
        with registry.isolated():
            yield
    finally:
        policy.configure(previous)


def operator_allows(*modules: str, trust: bool = False) -> None:
    """This process's operator allows `modules` (as `--allow-imports`)."""
    policy.configure(Policy(tuple(modules), trust))


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
        ("numpy.memmap", "module numpy is not in the allowlist"),
        ("psutil.Popen", "module psutil is not in the allowlist"),
        ("ptutils.store.local.LocalStore", "module ptutils.store.local is not in the allowlist"),
        ("ptutils.engine.Engine", "module ptutils.engine is not in the allowlist"),
        ("ptutils.runner.Summary", "module ptutils.runner is not in the allowlist"),
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
    assert "my_modules" not in sys.modules, "a session file never takes a plain module name"


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
        thing = registry.resolve("scoped_mod.Thing")
        assert thing.__name__ == "Thing" and thing.__module__ in sys.modules
    assert thing.__module__ not in sys.modules
    with pytest.raises(RegistryError, match="not in the allowlist"):
        registry.resolve("scoped_mod.Thing")


@pytest.fixture
def userpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package `userpkg_t` whose import writes a marker file."""
    package = tmp_path / "userpkg_t"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_module(package, "models", USER_MODULE, marker=tmp_path / "imported.txt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userpkg_t", raising=False)
    monkeypatch.delitem(sys.modules, "userpkg_t.models", raising=False)
    return tmp_path / "imported.txt"


def test_imports_by_module_name_need_the_operators_allowance(userpkg: Path) -> None:
    with pytest.raises(ConfigError) as info:
        registry.allow_imports(["userpkg_t.models"])
    message = str(info.value)
    assert "'userpkg_t.models' is not allowed" in message
    assert "--allow-imports userpkg_t.models" in message
    assert "PTUTILS_ALLOW_IMPORTS" in message and "ptutils.modules" in message
    with pytest.raises(RegistryError, match="module userpkg_t.models is not in the allowlist"):
        registry.resolve("userpkg_t.models.UserNet")
    assert not userpkg.exists() and "userpkg_t.models" not in sys.modules

    operator_allows("userpkg_t")
    assert registry.resolve("userpkg_t.models.UserNet").__module__ == "userpkg_t.models"
    assert registry.allow_imports(["userpkg_t.models"]) == ["userpkg_t.models"]
    assert userpkg.exists()


def test_a_policy_passed_in_wins_over_the_process_policy(userpkg: Path) -> None:
    names = registry.allow_imports(["userpkg_t.models"], policy=Policy(("userpkg_t.models",)))
    assert names == ["userpkg_t.models"] and userpkg.exists()


def test_missing_imports_name_the_entry_and_the_path_tried(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        registry.allow_imports(["./nope.py"], base_dir=tmp_path)
    assert "./nope.py" in str(info.value) and str(tmp_path / "nope.py") in str(info.value)
    operator_allows("no_such_pkg_xyz")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_xyz.models'"):
        registry.allow_imports(["no_such_pkg_xyz.models"])


def test_imports_refuse_the_standard_library_and_shadowing_files(tmp_path: Path) -> None:
    operator_allows("psutil")  # even an operator cannot allow the standard library
    with pytest.raises(ConfigError, match="standard library"):
        registry.allow_imports(["subprocess"])
    write_module(tmp_path, "json", "class Thing:\n    pass\n")
    with pytest.raises(ConfigError, match="rename the file"):
        registry.allow_imports(["json.py"], base_dir=tmp_path)
    assert sys.modules["json"].__file__ != str(tmp_path / "json.py")


@pytest.mark.parametrize("value", ["os", "subprocess.run", "builtins", "mylab,importlib"])
def test_the_operator_cannot_allow_the_standard_library(value: str) -> None:
    with pytest.raises(ConfigError, match="standard library"):
        policy.parse_allow(value, "--allow-imports")
    with pytest.raises(ConfigError, match=r"\$PTUTILS_ALLOW_IMPORTS.*standard library"):
        Policy.from_env({"PTUTILS_ALLOW_IMPORTS": value})


def test_policy_from_the_environment() -> None:
    assert Policy.from_env({}) == Policy()
    got = Policy.from_env({"PTUTILS_ALLOW_IMPORTS": " mylab.models, other ,",
                           "PTUTILS_TRUST_SESSION_CODE": "1"})
    assert got == Policy(("mylab.models", "other"), True)
    with pytest.raises(ConfigError, match="not a module name"):
        policy.parse_allow("my-lab")
    with pytest.raises(ConfigError, match="PTUTILS_TRUST_SESSION_CODE='maybe'"):
        Policy.from_env({"PTUTILS_TRUST_SESSION_CODE": "maybe"})


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


# --- session code and session scopes -------------------------------------------------
def stored(tmp_path: Path, name: str, body: str) -> tuple[dict, list[dict]]:
    """A stored `imports:` reference and the session's `code`, as a worker receives them
    (the source is read from a file, then forgotten by this process)."""
    import ptutils.sources as sources

    found = SourceFile.read(str(write_module(tmp_path, name, body)))
    sources._local.pop(found.sha256)  # a worker never read the file
    return found.reference(), [found.to_doc()]


def test_stored_session_code_loads_only_when_the_operator_trusts_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    ref, code = stored(tmp_path, "shipped_mod", f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("ran")

        class Thing:
            pass
    """)
    with pytest.raises(ConfigError) as info:
        registry.allow_imports([ref], code=code)
    message = str(info.value)
    assert "shipped_mod.py is session code" in message
    assert "--trust-session-code" in message and "PTUTILS_TRUST_SESSION_CODE=1" in message
    assert not marker.exists()

    operator_allows(trust=True)
    with registry.session_scope():
        assert registry.allow_imports([ref], code=code) == ["shipped_mod"]
        assert registry.resolve("shipped_mod.Thing").__name__ == "Thing"
    assert marker.read_text() == "ran"
    with pytest.raises(ConfigError, match="not stored with the session"):
        registry.allow_imports([ref], code=[])


def test_a_stored_source_that_does_not_match_its_hash_is_refused(tmp_path: Path) -> None:
    ref, code = stored(tmp_path, "shipped_mod", "class Thing:\n    pass\n")
    code[0]["source"] += "import os; os.system('true')\n"
    operator_allows(trust=True)
    with pytest.raises(ConfigError, match="does not match its sha256"):
        registry.allow_imports([ref], code=code)


def test_a_stored_config_never_loads_a_path(tmp_path: Path) -> None:
    write_module(tmp_path, "disk_mod", "class Thing:\n    pass\n", marker=tmp_path / "ran")
    operator_allows(trust=True)
    with pytest.raises(ConfigError, match="is a path"):
        registry.allow_imports([str(tmp_path / "disk_mod.py")], from_disk=False)
    assert not (tmp_path / "ran").exists()


def test_files_this_process_read_load_without_trust(tmp_path: Path) -> None:
    """`ptutils run`: the local user is the operator of the files on their own disk."""
    found = SourceFile.read(str(write_module(tmp_path, "local_mod", "class Thing:\n    pass\n")))
    assert registry.allow_imports([found.reference()], code=None) == ["local_mod"]


NET_V1 = """
    import torch
    from ptutils.registry import register

    @register(name="SessionNet")
    class Net(torch.nn.Module):
        width = 1
"""


def test_two_sessions_files_of_one_name_never_meet(tmp_path: Path) -> None:
    operator_allows(trust=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_a, code_a = stored(tmp_path / "a", "my_modules", NET_V1)
    ref_b, code_b = stored(tmp_path / "b", "my_modules", NET_V1.replace("width = 1", "width = 2"))
    assert ref_a["module"] == ref_b["module"] and ref_a["sha256"] != ref_b["sha256"]
    seen = []
    for ref, code in [(ref_a, code_a), (ref_b, code_b), (ref_a, code_a)]:
        with registry.session_scope():
            registry.allow_imports([ref], code=code)
            by_path, by_alias = registry.resolve("my_modules.Net"), registry.resolve("SessionNet")
            assert by_path is by_alias and registry.resolve("Net") is by_path
            seen.append((by_path.width, by_path.__module__))
        assert by_path.__module__ not in sys.modules
        with pytest.raises(RegistryError):
            registry.resolve("SessionNet")
    assert [w for w, _ in seen] == [1, 2, 1]
    assert seen[0][1] == seen[2][1] != seen[1][1]
    with pytest.raises(ConfigError, match="two different files are named my_modules.py"):
        registry.allow_imports([ref_a, ref_b], code=[*code_a, *code_b])


def test_registrations_of_a_module_imported_by_name_outlive_the_session(userpkg: Path) -> None:
    """A module imported by name runs its decorators once per process: they must stay."""
    models = userpkg.parent / "userpkg_t" / "models.py"
    models.write_text(models.read_text() + textwrap.dedent("""
        from ptutils.registry import register
        register(UserNet, name="PkgNet")
    """))
    operator_allows("userpkg_t")
    for _ in range(2):
        with registry.session_scope():
            registry.allow_imports(["userpkg_t.models"])
            assert registry.resolve("PkgNet").__module__ == "userpkg_t.models"


# --- entry points ------------------------------------------------------------------------
def install_distribution(site: Path, dist: str, package: str, entry_points: str,
                         files: dict[str, str]) -> None:
    """A distribution as pip leaves it: the package, and `*.dist-info` with entry points."""
    (site / package).mkdir(parents=True)
    for name, body in files.items():
        (site / package / name).write_text(textwrap.dedent(body))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ptutils.modules]\n{entry_points}\n")


def test_modules_and_classes_declared_by_an_installed_package_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = "import torch\n\nclass Net(torch.nn.Module):\n    pass\n\nclass Other(Net):\n    pass\n"
    install_distribution(tmp_path, "eplab", "eplab", "nets = eplab.nets",
                         {"__init__.py": "", "nets.py": classes})
    install_distribution(tmp_path, "eponly", "eponly", "net = eponly.models:Net",
                         {"__init__.py": "", "models.py": classes})
    (tmp_path / "undeclared").mkdir()
    (tmp_path / "undeclared" / "__init__.py").write_text(classes)
    monkeypatch.syspath_prepend(str(tmp_path))

    assert registry.resolve("eplab.nets.Net").__module__ == "eplab.nets"
    assert registry.resolve("eplab.nets.Other").__module__ == "eplab.nets"
    assert registry.allow_imports(["eplab.nets"]) == ["eplab.nets"]
    assert registry.resolve("eponly.models.Net").__module__ == "eponly.models"
    with pytest.raises(RegistryError, match="not in the allowlist"):
        registry.resolve("eponly.models.Other")  # only the declared class
    with pytest.raises(RegistryError, match="module undeclared is not in the allowlist"):
        registry.resolve("undeclared.Net")
    assert "undeclared" not in sys.modules
    assert "eplab.nets" in registry.default_registry.prefixes()
