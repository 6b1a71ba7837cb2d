"""Times the real OPA engine (opa-golib-python-bindings) on the decision of benches/decision.rs:
the decision rules (patch, warn, deny) on the first input and the patch rule on the second (the
convergence pass), and a trivial query with the same inputs, which is what the bindings cost.

Usage: opa_decision.py POLICY_DIR WORK_DIR SAMPLES   (WORK_DIR holds data.json and inputs.json)
Prints {"decision_us": median, "trivial_us": median, "patch": [...]} as JSON."""

import json
import pathlib
import statistics
import sys
import time

from opa_bindings.engine import OpaEngine

policies, work, samples = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
engine = OpaEngine()
for path in sorted(policies.glob("*.rego")):
    engine.add_policy(str(path), path.read_text())
engine.add_data(json.loads((work / "data.json").read_text()))
decide_input, converge_input = json.loads((work / "inputs.json").read_text())

DECIDE = 'result := {"patch": data.coral.mutate.patch, "warn": data.coral.mutate.warn, "deny": data.coral.mutate.deny}'
CONVERGE = "result := data.coral.mutate.patch"
TRIVIAL = "result := 1"


def decision():
    first = engine.eval_query(DECIDE, input=decide_input)
    engine.eval_query(CONVERGE, input=converge_input)
    return first


def trivial():
    engine.eval_query(TRIVIAL, input=decide_input)
    engine.eval_query(TRIVIAL, input=converge_input)


def median_us(run):
    for _ in range(max(1, samples // 10)):
        run()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


result = decision()
print(json.dumps({
    "decision_us": median_us(decision),
    "trivial_us": median_us(trivial),
    "patch": result[0]["result"]["patch"] if result else None,
}))
