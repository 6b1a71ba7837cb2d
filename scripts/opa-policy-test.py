"""Runs every test_* rule of the policy tests under the real OPA engine (OPA v1, in-process,
from the PyPI package opa-golib-python-bindings) and compares each outcome with the one
`coral policy test --format json` reported for the same paths.

Usage: opa-policy-test.py CORAL_RESULTS.json PATH...

Files are loaded as `opa test` loads them: every .rego file under the paths, and every
data.json / data.yaml with the data path of its directory below the path it was found under.
Exits 1 when the two engines disagree on any test, or do not find the same tests."""

import json
import pathlib
import re
import sys

from opa_bindings.engine import OpaEngine, OpaError

DATA_FILES = {"data.json", "data.yaml", "data.yml"}
TEST_HEAD = re.compile(r"^(test_[A-Za-z0-9_]*)")
PACKAGE = re.compile(r"^package\s+([A-Za-z0-9_.]+)", re.MULTILINE)


def collect(paths):
    """The .rego files and the data files (with their data path) under the paths."""
    rego, data = [], []
    for root in map(pathlib.Path, paths):
        if root.is_file():
            candidates = [root]
        else:
            candidates = sorted(p for p in root.rglob("*") if p.is_file())
        for path in candidates:
            if path.suffix == ".rego":
                rego.append(path)
            elif path.name in DATA_FILES:
                prefix = [] if root.is_file() else list(path.parent.relative_to(root).parts)
                data.append((path, prefix))
    return sorted(set(rego)), data


def load_data(path):
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    import yaml  # only needed for YAML data files

    return yaml.safe_load(text)


def discover(source):
    """Names of the test_* rules of a file, first definition kept, as coral policy test finds them."""
    seen = []
    for line in source.splitlines():
        match = TEST_HEAD.match(line)
        if match and match.group(1) not in seen:
            seen.append(match.group(1))
    return seen


def opa_outcomes(paths):
    engine = OpaEngine()
    rego, data = collect(paths)
    tests = []
    for path in rego:
        source = path.read_text()
        engine.add_policy(str(path), source)
        if path.name.endswith("_test.rego"):
            package = PACKAGE.search(source).group(1)
            tests += [(f"data.{package}", name) for name in discover(source)]
    for path, prefix in data:
        value = load_data(path)
        for key in reversed(prefix):
            value = {key: value}
        engine.add_data(value)
    outcomes = {}
    for package, name in tests:
        try:
            bindings = engine.eval_query(f"result := {package}.{name}")
            # Undefined (no binding) and false fail, as under opa test.
            outcome = "PASS" if bindings and bindings[0].get("result") is True else "FAIL"
        except OpaError as error:
            outcome = f"ERROR ({error})"
        outcomes[(package, name)] = outcome
    return outcomes


def coral_outcomes(results_file):
    outcomes = {}
    for result in json.loads(pathlib.Path(results_file).read_text()):
        if result.get("error"):
            outcome = f"ERROR ({result['error'].get('message', '')})"
        elif result.get("fail"):
            outcome = "FAIL"
        else:
            outcome = "PASS"
        outcomes[(result["package"], result["name"])] = outcome
    return outcomes


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: opa-policy-test.py CORAL_RESULTS.json PATH...")
    coral = coral_outcomes(sys.argv[1])
    opa = opa_outcomes(sys.argv[2:])
    disagreements = []
    for test in sorted(set(coral) | set(opa)):
        ours, theirs = coral.get(test, "not found"), opa.get(test, "not found")
        if ours.split(" ")[0] != theirs.split(" ")[0]:
            disagreements.append((test, ours, theirs))
    for (package, name), ours, theirs in disagreements:
        print(f"DIFFERS {package}.{name}: coral policy test {ours}, OPA {theirs}")
    passed = sum(1 for outcome in opa.values() if outcome == "PASS")
    print(f"OPA: {passed}/{len(opa)} passed; "
          f"{len(opa) - len(disagreements)} of {len(set(coral) | set(opa))} tests agree with coral policy test")
    sys.exit(1 if disagreements else 0)


if __name__ == "__main__":
    main()
