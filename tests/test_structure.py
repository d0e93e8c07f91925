"""The layout of the code: the method (lib/, models/) stands alone, no module imports itself back through
others, and lib/ and engine/ give each function name one meaning. Imports are read from the source with
``ast`` (those inside functions too), so a late import counts as an import."""
import ast
import importlib
import os
import sys

import pytest

from conftest import ROOT

PACKAGES = ("lib", "models", "engine", "datasets")
METHOD = ("lib", "models")
METHOD_MAY_IMPORT = {"torch", "numpy", "scipy", "sklearn"}  # besides the standard library


def module_files():
    """{module name: path} of every module of the packages and of the scripts at the top of the repo."""
    files = {}
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                files[module] = os.path.join(ROOT, package, name)
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            files[name[:-3]] = os.path.join(ROOT, name)
    return files


def imported_names(module, path):
    """Every absolute name ``module`` imports: ``import a.b`` gives a.b, ``from a import b`` gives a.b
    (b may be a module or an attribute of a), relative imports resolved against ``module``'s package."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_edges(files):
    """{module: the project modules it imports}: the longest project module that each imported name is or
    lies in."""
    edges = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in files:
                    if candidate != module:
                        targets.add(candidate)
                    break
        edges[module] = targets
    return edges


def find_cycle(edges):
    """One import cycle as a list of modules [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("module", [m for m in module_files() if m.split(".")[0] in PACKAGES])
def test_every_module_imports(module):
    assert importlib.import_module(module).__name__ == module


def test_the_project_has_no_import_cycle():
    edges = project_edges(module_files())
    assert "engine.system" in edges["engine.distributed"]  # the reading sees imports (the graph is not empty)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_search_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_method_imports_only_itself_and_its_numeric_libraries():
    files = module_files()
    edges = project_edges(files)
    for module, path in files.items():
        if module.split(".")[0] not in METHOD:
            continue
        assert {target.split(".")[0] for target in edges[module]} <= set(METHOD), module
        outside = {name.split(".")[0] for name in imported_names(module, path)} - set(files) - set(METHOD)
        assert outside <= METHOD_MAY_IMPORT | set(sys.stdlib_module_names), (module, outside)


def test_lib_and_engine_give_each_function_name_one_meaning():
    defined = {}
    for module, path in module_files().items():
        if module.split(".")[0] in ("lib", "engine"):
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.setdefault(node.name, []).append(module)
    assert {name: where for name, where in defined.items() if len(where) > 1} == {}
    assert "compute_features" in defined and "discover_neighbourhoods" in defined  # the search saw definitions


# ---- the scripts' shape: one epoch function signature, short parameter lists, short functions ----

SCRIPTS = [name for name in ("super_and.py", "main.py", "semi.py", "joint.py")
           if os.path.exists(os.path.join(ROOT, name))]
EPOCH_PARAMETERS = ["run", "state", "epoch", "args"]
MOST_PARAMETERS = 6
MOST_LINES = 60  # a function of a script, docstring included: one screen


def script_tree(name):
    with open(os.path.join(ROOT, name)) as f:
        return ast.parse(f.read(), name)


def parameter_names(function):
    """Every parameter of a ``def``: positional-only, ordinary, *args, keyword-only, **kwargs."""
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args]
    names += [arguments.vararg.arg] if arguments.vararg else []
    names += [a.arg for a in arguments.kwonlyargs]
    return names + ([arguments.kwarg.arg] if arguments.kwarg else [])


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_has_the_one_epoch_function(name):
    """``train_and_save(run, state, epoch, args)`` at the top of every training script, nothing defaulted."""
    functions = {node.name: node for node in script_tree(name).body if isinstance(node, ast.FunctionDef)}
    assert "train_and_save" in functions, f"{name} has no train_and_save"
    epoch = functions["train_and_save"]
    assert parameter_names(epoch) == EPOCH_PARAMETERS and not epoch.args.defaults, ast.unparse(epoch.args)


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_function_of_a_script_takes_more_than_six_parameters(name):
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    functions = [node for node in ast.walk(script_tree(name)) if isinstance(node, kinds)]
    assert len(functions) > 3  # the walk sees the script's functions, nested ones and lambdas included
    long = {getattr(f, "name", f"lambda at line {f.lineno}"): parameter_names(f) for f in functions
            if len(parameter_names(f)) > MOST_PARAMETERS}
    assert long == {}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_function_of_a_script_fits_a_screen(name):
    """A script reads top to bottom: ``main`` and each function short (the method's pieces live in lib/)."""
    functions = [node for node in script_tree(name).body if isinstance(node, ast.FunctionDef)]
    assert "main" in {f.name for f in functions}  # the parse sees the script's functions
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions if f.end_lineno - f.lineno + 1 > MOST_LINES}
    assert long == {}


def test_the_shape_checks_see_a_long_parameter_list_and_another_epoch_signature():
    tree = ast.parse("def f(a, b, c, d, e, f, g=1):\n    pass\ndef train_and_save(run, state, epoch, args, extra=0):\n"
                     "    pass\n")
    first, second = tree.body
    assert len(parameter_names(first)) == 7 > MOST_PARAMETERS
    assert parameter_names(second) != EPOCH_PARAMETERS
