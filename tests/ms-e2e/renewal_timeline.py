"""Reads the client logs of runs of Microsoft's SAS renewal tests (test_sas_renews,
test_sync_sas_renews) against the local hub and says, for each test, whether the test's
on_connection_state_change handler read a state that had already changed again.

    python3 renewal_timeline.py RUN_DIR...

Each RUN_DIR holds `out.txt` (what scripts/ms-e2e printed, for the order of the tests) and
`client.log` (pytest's --log-file at DEBUG with the format docs/ms-e2e.md gives: the time with
milliseconds first, then the thread, the logger, the level and the message).

Why: the SDK queues a CONNECTION_STATE_CHANGE client event on every connect and disconnect, and
the handler reads `client.connected` when it runs, not when the event happened
(azure-iot-device 2.14.0, iothub/abstract_clients.py `_on_connected`/`_on_disconnected`). A
Disconnected event served after the reconnect's CONNACK reads True. The events and the handler
calls are paired in order (the aio runner serves them in order; so does the sync runner as long
as calls do not overlap, which at one event every few milliseconds they do not).

Only the standard library; not used by scripts/test or scripts/ms-e2e.
"""

import re
import statistics
import sys
from datetime import datetime


def _t(line):
    return datetime.strptime(line[:12], "%H:%M:%S.%f")


def _ms(a, b):
    return round((b - a).total_seconds() * 1000, 1)


def _hms(at):
    return at.strftime("%H:%M:%S.%f")[:-3]


def analyse(path):
    """One dict per test (a test starts at the suite's "Connecting device_id=" line)."""
    segments, current = [], None
    for line in open(path, errors="replace"):
        if " conftest INFO Connecting device_id=" in line:
            current = []
            segments.append(current)
        if current is not None:
            current.append(line.rstrip("\n"))
    tests = []
    for lines in segments:
        armed = False  # the handler is set: events are queued for it from here on
        queue, stale, dispatch, reconnect = [], [], [], []
        failed = last_connack = pending_disconnect = None
        for line in lines:
            if "HANDLER RUNNER (CLIENT EVENT): Starting runner" in line:
                armed = True
            if "Received CONNACK" in line:
                last_connack = _t(line)
                if pending_disconnect is not None:
                    reconnect.append(_ms(pending_disconnect, last_connack))
                    pending_disconnect = None
            m = re.search(r"Connection State - (Connected|Disconnected)", line)
            if m and armed:
                queue.append((m.group(1), _t(line)))
                if m.group(1) == "Disconnected":
                    pending_disconnect = _t(line)
            m = re.search(r"handle_on_connection_state_change: (True|False)", line)
            if m and queue:
                kind, at = queue.pop(0)
                seen_connected = m.group(1) == "True"
                if kind == "Disconnected":
                    dispatch.append(_ms(at, _t(line)))
                    if seen_connected:
                        stale.append(
                            "Disconnected event at {} served {} ms later, after the CONNACK at {}:"
                            " the handler read connected=True".format(
                                _hms(at), _ms(at, _t(line)), _hms(last_connack)
                            )
                        )
                elif not seen_connected:
                    stale.append(
                        "Connected event at {} served {} ms later: the handler read"
                        " connected=False".format(_hms(at), _ms(at, _t(line)))
                    )
            if "EXCEPTION RAISED in call phase" in line:
                failed = line.split("call phase: ", 1)[1]
        tests.append(
            {"failed": failed, "stale": stale, "dispatch": dispatch, "reconnect": reconnect}
        )
    return tests


def _order(out_txt):
    """The tests' names in the order they ran, from the testdox lines of the run's output."""
    names = []
    for line in open(out_txt, errors="replace"):
        m = re.search(r"\[(auto_connect \w+-connection_retry \w+)\]", line)
        if m and ("[x]" in line or "[ ]" in line):
            names.append(m.group(1))
    # The aio module runs first, then the sync one (4 parametrizations each).
    return [("aio " if i < 4 else "sync ") + n for i, n in enumerate(names)]


def main(run_dirs):
    everything = []
    for d in run_dirs:
        names = _order(d + "/out.txt")
        for i, test in enumerate(analyse(d + "/client.log")):
            name = names[i] if i < len(names) else "?"
            everything.append(test)
            print(d.rstrip("/").split("/")[-1], name, "FAILED" if test["failed"] else "passed",
                  "| stale handler reads:", len(test["stale"]))
            for s in test["stale"]:
                print("    ", s)
            if test["failed"]:
                print("     failure:", test["failed"])
    dispatch = [x for t in everything for x in t["dispatch"]]
    reconnect = [x for t in everything for x in t["reconnect"]]
    print("tests:", len(everything), "failed:", sum(1 for t in everything if t["failed"]),
          "| Disconnected events served:", len(dispatch),
          "of which after the reconnect:", sum(len(t["stale"]) for t in everything))
    if dispatch:
        print("Disconnected -> its handler call (ms): median", statistics.median(dispatch),
              "max", max(dispatch))
    if reconnect:
        print("Disconnected -> next CONNACK (ms): median", statistics.median(reconnect),
              "min", min(reconnect), "max", max(reconnect))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1:])
