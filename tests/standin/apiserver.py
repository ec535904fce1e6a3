"""A stand-in Kubernetes API server for pontoon's tests and benchmarks.

Plain HTTP on the address given, every request needing the bearer token given. It serves what
pontoon's agent uses, the way the real API server does (checked with kubectl in the tests):

- discovery: /api, /api/v1, /apis, /apis/networking.k8s.io/v1, /version
- nodes (cluster), namespaces (cluster), pods and networkpolicies (namespaced, and across all
  namespaces): list (limit/continue pagination, labelSelector equality), get, watch (from a
  resourceVersion, with bookmarks and timeoutSeconds), create (POST), replace (PUT), patch
  (merge and strategic-merge patches of plain objects; of nodes/<name>/status and
  pods/<ns>/<name>/status too, which change metadata and status but never spec), delete.

State: the objects of the JSON file given (a list of objects, or {"items": [...]}), kept in
memory. Every request is appended to `<state dir>/requests.log` as "METHOD PATH" so tests can
check what the agent asked for (RBAC). Served over TLS with CERT and KEY (PEM), as the real one
is (clients do not send tokens over plain HTTP).
Run: python3 apiserver.py ADDR:PORT TOKEN STATE.json CERT KEY
"""

import http.server
import json
import os
import sys
import threading
import time
import urllib.parse

import ssl

ADDR, TOKEN, STATE, CERT, KEY = sys.argv[1:6]
LOG = os.path.join(os.path.dirname(os.path.abspath(STATE)), "requests.log")

RESOURCES = {
    # plural: (group/version prefix, kind, namespaced)
    "nodes": ("/api/v1", "Node", False),
    "namespaces": ("/api/v1", "Namespace", False),
    "pods": ("/api/v1", "Pod", True),
    "networkpolicies": ("/apis/networking.k8s.io/v1", "NetworkPolicy", True),
}
API_VERSION = {"/api/v1": "v1", "/apis/networking.k8s.io/v1": "networking.k8s.io/v1"}

lock = threading.Condition()
rv = 1
objects = {}  # (plural, namespace, name) -> object
events = []  # (rv, plural, type, object)


def key_of(plural, obj):
    md = obj["metadata"]
    ns = md.get("namespace", "") if RESOURCES[plural][2] else ""
    return (plural, ns, md["name"])


def plural_of(kind):
    for p, (_, k, _) in RESOURCES.items():
        if k == kind:
            return p
    raise KeyError(kind)


def store(plural, obj, kind="ADDED"):
    """Stores obj (a new resourceVersion) and records the watch event. Holds the lock."""
    global rv
    rv += 1
    prefix, k, namespaced = RESOURCES[plural]
    obj["kind"] = k
    obj["apiVersion"] = API_VERSION[prefix]
    md = obj.setdefault("metadata", {})
    md["resourceVersion"] = str(rv)
    md.setdefault("uid", "uid-%s-%s-%d" % (plural, md["name"], rv))
    md.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
    if namespaced:
        md.setdefault("namespace", "default")
    objects[key_of(plural, obj)] = obj
    events.append((rv, plural, kind, json.loads(json.dumps(obj))))
    lock.notify_all()


def delete(plural, key):
    global rv
    obj = objects.pop(key)
    rv += 1
    obj["metadata"]["resourceVersion"] = str(rv)
    events.append((rv, plural, "DELETED", obj))
    lock.notify_all()
    return obj


def load():
    with open(STATE) as f:
        data = json.load(f)
    items = data["items"] if isinstance(data, dict) else data
    with lock:
        for o in items:
            store(plural_of(o["kind"]), o)


def merge(dst, patch):
    """JSON merge patch (RFC 7386), which is also what a strategic merge patch of plain
    metadata and of fields without merge keys does."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(dst, dict):
        dst = {}
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        else:
            dst[k] = merge(dst.get(k), v)
    return dst


def matches(obj, selector):
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in selector.split(","):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def status(code, reason, message):
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"null")

    def route(self):
        """(plural, namespace or None, name or None, query), or None."""
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        parts = [p for p in u.path.split("/") if p]
        for prefix in API_VERSION:
            pp = [p for p in prefix.split("/") if p]
            if parts[: len(pp)] != pp:
                continue
            rest = parts[len(pp):]
            ns = None
            # namespaces/<ns>/<plural>[/<name>] is namespaced; namespaces[/<name>] is the
            # cluster-scoped Namespace resource itself.
            if len(rest) >= 3 and rest[0] == "namespaces":
                ns, rest = rest[1], rest[2:]
            # <plural>/<name>/status is the status subresource (see do_PATCH).
            self.sub = None
            if len(rest) == 3 and rest[2] == "status":
                self.sub, rest = "status", rest[:2]
            if not rest or len(rest) > 2 or rest[0] not in RESOURCES:
                return None
            plural = rest[0]
            if RESOURCES[plural][0] != prefix or (ns is not None and not RESOURCES[plural][2]):
                return None
            return plural, ns, rest[1] if len(rest) > 1 else None, q
        return None

    def authorized(self):
        with open(LOG, "a") as f:
            f.write("%s %s\n" % (self.command, self.path))
        if self.headers.get("Authorization") != "Bearer " + TOKEN:
            self.reply(*status(401, "Unauthorized", "Unauthorized"))
            return False
        return True

    def discovery(self):
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-standin", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ADDR}]}
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                "name": "networking.k8s.io",
                "versions": [{"groupVersion": "networking.k8s.io/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "networking.k8s.io/v1", "version": "v1"}}]}
        for prefix, gv in API_VERSION.items():
            if path == prefix:
                res = []
                for p, (pre, kind, namespaced) in RESOURCES.items():
                    if pre == prefix:
                        short = {"nodes": ["no"], "namespaces": ["ns"], "pods": ["po"],
                                 "networkpolicies": ["netpol"]}[p]
                        res.append({"name": p, "singularName": kind.lower(), "namespaced": namespaced,
                                    "shortNames": short,
                                    "kind": kind, "verbs": ["create", "delete", "get", "list", "patch",
                                                            "update", "watch"]})
                        if p in ("nodes", "pods"):
                            res.append({"name": p + "/status", "singularName": "", "namespaced": namespaced,
                                        "kind": kind, "verbs": ["get", "patch", "update"]})
                return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res}
        return None

    def do_GET(self):
        if not self.authorized():
            return
        d = self.discovery()
        if d is not None:
            return self.reply(200, d)
        r = self.route()
        if r is None:
            return self.reply(*status(404, "NotFound", "the server could not find the requested resource"))
        plural, ns, name, q = r
        if q.get("watch") in ("true", "1"):
            return self.watch(plural, ns, name, q)
        with lock:
            if name:
                o = objects.get((plural, ns or "", name))
                if o is None:
                    return self.reply(*status(404, "NotFound", '%s "%s" not found' % (plural, name)))
                return self.reply(200, o)
            items = [o for (p, n, _), o in sorted(objects.items())
                     if p == plural and (ns is None or n == ns) and matches(o, q.get("labelSelector"))]
            current = str(rv)
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0)
        page = items[start:start + limit] if limit else items[start:]
        md = {"resourceVersion": current}
        if limit and start + limit < len(items):
            md["continue"] = str(start + limit)
            md["remainingItemCount"] = len(items) - start - limit
        prefix, kind, _ = RESOURCES[plural]
        self.reply(200, {"kind": kind + "List", "apiVersion": API_VERSION[prefix], "metadata": md, "items": page})

    def watch(self, plural, ns, name, q):
        since = int(q.get("resourceVersion") or 0)
        deadline = time.time() + min(float(q.get("timeoutSeconds") or 300), 300)
        bookmarks = q.get("allowWatchBookmarks") == "true"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = since
        last_bookmark = time.time()
        try:
            while time.time() < deadline:
                with lock:
                    if since and events and since < events[0][0] - 1:
                        out = [{"type": "ERROR", "object": status(410, "Expired", "too old resource version")[1]}]
                        deadline = 0
                    else:
                        out = [{"type": t, "object": o} for (r, p, t, o) in events
                               if r > sent and p == plural
                               and (ns is None or o["metadata"].get("namespace", "") == ns)
                               and (name is None or o["metadata"]["name"] == name)
                               and matches(o, q.get("labelSelector"))]
                        sent = rv
                        if not out:
                            lock.wait(timeout=1.0)
                for ev in out:
                    line = json.dumps(ev).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                if bookmarks and time.time() - last_bookmark > 5:
                    prefix, kind, _ = RESOURCES[plural]
                    bm = {"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": API_VERSION[prefix],
                                                         "metadata": {"resourceVersion": str(sent)}}}
                    line = json.dumps(bm).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    last_bookmark = time.time()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        if not self.authorized():
            self.body()
            return
        r = self.route()
        if r is None or r[2] is not None or self.sub:
            return self.reply(*status(404, "NotFound", "not found"))
        plural, ns, _, _ = r
        obj = self.body()
        if RESOURCES[plural][2]:
            obj.setdefault("metadata", {})["namespace"] = ns or "default"
        with lock:
            if key_of(plural, obj) in objects:
                return self.reply(*status(409, "AlreadyExists", "already exists"))
            store(plural, obj)
            self.reply(201, obj)

    def write(self, plural, old, obj):
        """Stores a replaced or patched object as the real server does: a write of the
        object leaves its status alone, a write of the status subresource leaves its spec
        alone (metadata changes apply to both). Holds the lock."""
        keep = "spec" if self.sub == "status" else "status"
        obj.pop(keep, None)
        if keep in old:
            obj[keep] = old[keep]
        store(plural, obj, "MODIFIED")
        self.reply(200, obj)

    def do_PUT(self):
        if not self.authorized():
            return
        r = self.route()
        if r is None or r[2] is None:
            return self.reply(*status(404, "NotFound", "not found"))
        plural, ns, name, _ = r
        obj = self.body()
        with lock:
            old = objects.get((plural, ns or "", name))
            if old is None:
                return self.reply(*status(404, "NotFound", "not found"))
            self.write(plural, old, obj)

    def do_PATCH(self):
        if not self.authorized():
            return
        r = self.route()
        if r is None or r[2] is None:
            return self.reply(*status(404, "NotFound", "not found"))
        plural, ns, name, _ = r
        patch = self.body()
        with lock:
            k = (plural, ns or "", name)
            if k not in objects:
                return self.reply(*status(404, "NotFound", '%s "%s" not found' % (plural, name)))
            old = objects[k]
            self.write(plural, old, merge(json.loads(json.dumps(old)), patch))

    def do_DELETE(self):
        if not self.authorized():
            return
        r = self.route()
        if r is None or r[2] is None or self.sub:
            return self.reply(*status(404, "NotFound", "not found"))
        plural, ns, name, _ = r
        self.body()  # DeleteOptions; read so the connection stays usable
        with lock:
            k = (plural, ns or "", name)
            if k not in objects:
                return self.reply(*status(404, "NotFound", "not found"))
            self.reply(200, delete(plural, k))


load()
host, port = ADDR.rsplit(":", 1)
server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
server.daemon_threads = True
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT, KEY)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
