"""Run one vnethook hook with a fake journald listening, print what it got.

Runs inside `unshare --mount --net --fork` (see tests/acceptance/test_journal.py):
a tmpfs over /run in the private mount namespace holds the journal socket,
so nothing of the host's /run or journal is touched.
argv: REPO LIBVIRT_ROOT CONFIG STATE DOMAIN_XML
"""

import json
import os
import socket
import subprocess
import sys

repo, root, config, state, xml = sys.argv[1:6]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
os.makedirs("/run/systemd/journal")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": repo,
       "VNETHOOK_CONFIG": config, "VNETHOOK_STATE_DIR": state, "VNETHOOK_LIBVIRT_ROOT": root}
with open(xml, "rb") as f:
    data = f.read()
cp = subprocess.run(["/usr/bin/python3", os.path.join(repo, "hooks", "qemu"), "web1", "started", "begin", "-"],
                    input=data, capture_output=True, env=env, cwd="/")
sock.setblocking(False)
messages = []
while True:
    try:
        raw = sock.recv(1 << 20)
    except BlockingIOError:
        break
    fields = {}
    for line in raw.split(b"\n"):
        if b"=" in line:
            k, v = line.split(b"=", 1)
            fields[k.decode()] = v.decode("utf-8", "replace")
    messages.append(fields)
print(json.dumps({"rc": cp.returncode, "stdout": cp.stdout.decode(), "stderr": cp.stderr.decode(),
                  "messages": messages}))
