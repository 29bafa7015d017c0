"""Schemathesis hooks for tests/api_conformance.rs: keep generated requests inside the test.

The API acts on the host: it opens, creates and copies into the files a request names, as
root, and connects to the NBD servers and replication shadows it names. Generated paths could name any file on the
machine, so before each request (in every phase: examples, coverage, fuzzing, stateful) every
absolute path in the body is moved under the test's sandbox directory (relative paths stay as
generated, for the server to refuse), and an NBD host becomes 127.0.0.1.
And `PATCH /vm {"state": "stopped"}` would end the VM under test, so it becomes a pause: the
test stops the VM itself at the end, once every other request has been made.
"""

import os
import re

import schemathesis

SANDBOX = os.environ["VMM_CONFORMANCE_SANDBOX"]
# The body fields that name host paths, in any device's backend, a RAM backing or a snapshot.
PATH_FIELDS = {"path", "socket", "unix"}


def confine(path: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.lstrip("/"))[:80] or "empty"
    if name in (".", ".."):
        name = "dot"
    return f"{SANDBOX}/{name}"


def confine_paths(value):
    if isinstance(value, dict):
        for key, item in value.items():
            if key in PATH_FIELDS and isinstance(item, str) and item.startswith("/"):
                value[key] = confine(item)
            elif key == "nbd" and isinstance(item, str) and item.startswith("unix:/"):
                value[key] = "unix:" + confine(item[len("unix:"):])
            elif key == "nbd" and isinstance(item, str) and ":" in item and not item.startswith("unix:"):
                # No connections to hosts on the network: a local port nothing listens on.
                value[key] = "127.0.0.1:" + item.rsplit(":", 1)[1]
            elif key == "target" and isinstance(item, str) and item.startswith("unix:/"):
                value[key] = "unix:" + confine(item[len("unix:"):])
            elif key == "target" and isinstance(item, str) and item.startswith("tcp:"):
                value[key] = "tcp:127.0.0.1:" + item.rsplit(":", 1)[-1]
            else:
                confine_paths(item)
    elif isinstance(value, list):
        for item in value:
            confine_paths(item)


@schemathesis.hook
def before_call(context, case, kwargs):
    if isinstance(case.body, (dict, list)):
        confine_paths(case.body)
    if (
        case.operation.method.upper() == "PATCH"
        and case.operation.path == "/vm"
        and isinstance(case.body, dict)
        and case.body.get("state") == "stopped"
    ):
        case.body["state"] = "paused"
