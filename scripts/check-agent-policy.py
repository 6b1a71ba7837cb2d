"""Evaluates the CEL of the ValidatingAdmissionPolicy that confines the agent
(deploy/base/agent-policy.yaml) on admission requests it must allow and deny, with cel-python:
the policy's match conditions, then its variables in order, then its validations."""

import copy
import sys

import celpy
import yaml

AGENT = "system:serviceaccount:coral-system:coral-agent"
CORAL = "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c"


def node(labels, unschedulable=False):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": labels},
            "spec": {"unschedulable": unschedulable}}


def request(resource, name, user=AGENT, node_name="node-a", operation="UPDATE"):
    extra = {"authentication.kubernetes.io/node-name": [node_name]} if node_name else {}
    return {"operation": operation, "name": name,
            "resource": {"group": "", "version": "v1", "resource": resource},
            "userInfo": {"username": user, "extra": extra}}


BASE = {"pool": "web", "kubernetes.io/hostname": "node-a", CORAL: "available"}
OTHER = "image.coral.dev/0000000000000000000000000000000000000000"
node_image = {"apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage", "metadata": {"name": "node-a"}}

# (what, request, object, oldObject, allowed)
CASES = [
    ("agent adds a Coral label to its node", request("nodes", "node-a"),
     node({**BASE, OTHER: "available"}), node(BASE), True),
    ("agent removes a Coral label from its node", request("nodes", "node-a"),
     node({k: v for k, v in BASE.items() if k != CORAL}), node(BASE), True),
    ("agent patches another node", request("nodes", "node-b"),
     node({**BASE, OTHER: "available"}), node(BASE), False),
    ("agent changes a label that is not Coral's", request("nodes", "node-a"),
     node({**BASE, "pool": "batch"}), node(BASE), False),
    ("agent adds a label that is not Coral's", request("nodes", "node-a"),
     node({**BASE, "evil": "yes"}), node(BASE), False),
    ("agent removes a label that is not Coral's", request("nodes", "node-a"),
     node({k: v for k, v in BASE.items() if k != "pool"}), node(BASE), False),
    ("agent changes its node's spec", request("nodes", "node-a"),
     node(BASE, unschedulable=True), node(BASE), False),
    ("agent creates its NodeImage", request("nodeimages", "node-a", operation="CREATE"),
     node_image, None, True),
    ("agent writes another node's NodeImage", request("nodeimages", "node-b"),
     node_image, node_image, False),
    ("agent token without a node name", request("nodes", "node-a", node_name=None),
     node(BASE), node(BASE), False),
    ("another user is not matched", request("nodes", "node-b", user="system:serviceaccount:coral-system:coral-controller"),
     node({**BASE, "pool": "x"}), node(BASE), True),
]


def evaluate(env, expression, context):
    return env.program(env.compile(expression)).evaluate(context)


def decide(policy, req, obj, old):
    env = celpy.Environment()
    context = {
        "request": celpy.json_to_cel(req),
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
    }
    for condition in policy["spec"].get("matchConditions", []):
        if not evaluate(env, condition["expression"], context):
            return True, "not matched"
    variables = {}
    for variable in policy["spec"].get("variables", []):
        context["variables"] = celpy.json_to_cel({})
        context["variables"] = celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): v for k, v in variables.items()})
        variables[variable["name"]] = evaluate(env, variable["expression"], context)
    context["variables"] = celpy.celtypes.MapType(
        {celpy.celtypes.StringType(k): v for k, v in variables.items()})
    for validation in policy["spec"]["validations"]:
        if not evaluate(env, validation["expression"], context):
            return False, validation.get("message") or validation.get("messageExpression")
    return True, "allowed"


def main():
    with open("deploy/base/agent-policy.yaml") as f:
        policy = next(d for d in yaml.safe_load_all(f) if d["kind"] == "ValidatingAdmissionPolicy")
    failed = 0
    for what, req, obj, old, allowed in CASES:
        got, why = decide(policy, copy.deepcopy(req), obj, old)
        if got != allowed:
            failed += 1
            print(f"WRONG {what}: expected {'allowed' if allowed else 'denied'}, got {why}", file=sys.stderr)
    print(f"agent policy: {len(CASES) - failed} of {len(CASES)} cases as expected")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
