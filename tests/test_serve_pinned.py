"""A pinned server and every server's lease: nothing acknowledged goes unserved, gc never takes a served version."""
import threading
import time

import httpx
import numpy as np

from deploy.client import VismemClient
from deploy.serving import create_app
from deploy.serving import served as served_module
from deploy.serving.served import ServedMemory
from memory import Memory, leases
from memory import manifest as mf
from memory.mutations import collect_garbage, remove_items
from test_serve import TOKEN, Running, make_memory


def _ids_served(url, x) -> set:
    with VismemClient(url) as c:
        return {n["id"] for row in c.neighbors(x, k=5)["neighbours"] for n in row}


def test_a_pinned_server_refuses_admin_changes_and_serves_its_version(tmp_path):
    root = str(tmp_path / "m")
    x, _, ids = make_memory(root, n=120)
    with Running(create_app(root, version=1, admin_token=TOKEN, poll_s=0.1)) as srv:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(srv.url + "/v1/admin/remove", json={"ids": [ids[0]]}, headers=headers)
        assert r.status_code == 409 and "pinned to version 1" in r.json()["error"], r.text
        r = httpx.post(srv.url + "/v1/admin/items", headers=headers,
                       json={"items": [{"id": "new", "embedding": [0.1] * 16, "label": "ant"}]})
        assert r.status_code == 409 and "pinned" in r.json()["error"]
        r = httpx.post(srv.url + "/v1/admin/remove", json={"ids": [ids[0]]})  # the token is checked first
        assert r.status_code == 401
        assert mf.list_versions(root) == [1]  # nothing was published
        assert ids[0] in _ids_served(srv.url, x[:1])
        # A version published elsewhere is not picked up: the pin is a promise of one fixed version.
        remove_items(root, ids=[ids[1]])
        time.sleep(0.5)  # five polls of an unpinned server
        assert ids[1] in _ids_served(srv.url, x[1:2])
        assert httpx.get(srv.url + "/v1/info").json()["pinned"] is True


def test_an_id_removed_with_a_200_is_never_served_again(tmp_path):
    """Queries race the removals; any query sent after a removal's 200 must not return that id."""
    root = str(tmp_path / "m")
    x, _, ids = make_memory(root, n=200)
    gone = ids[:5].tolist()
    answers, stop, errors = [], threading.Event(), []

    def ask(url):
        with VismemClient(url) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    nb = c.neighbors(x[:5], k=5)["neighbours"]
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    errors.append(repr(exc))
                    continue
                answers.append((sent, {n["id"] for row in nb for n in row}))

    # poll_s=0: nothing but the admin endpoint itself can swap the removal in.
    with Running(create_app(root, admin_token=TOKEN, poll_s=0)) as srv:
        threads = [threading.Thread(target=ask, args=(srv.url,), daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        acked = {}
        try:
            with VismemClient(srv.url, token=TOKEN) as admin:
                for i in gone:
                    assert admin.remove(ids=[i])["removed"] == 1
                    acked[i] = time.monotonic()
                    assert i not in _ids_served(srv.url, x[:5])
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert errors == [] and len(answers) > 0
    late = [(i, sent) for sent, seen in answers for i in seen if i in acked and sent > acked[i]]
    assert late == []
    assert mf.list_versions(root) == [1, 2, 3, 4, 5, 6]


def test_leases_outlive_their_first_period_and_gc_keeps_served_versions(tmp_path):
    """A pinned server and one that never polls both renew their leases; gc deletes only the unserved version."""
    root = str(tmp_path / "m")
    x, _, ids = make_memory(root, n=120)
    remove_items(root, ids=[ids[0]])  # version 2
    lease_s = 3.0
    with Running(create_app(root, version=1, poll_s=0, lease_s=lease_s)) as pinned, \
            Running(create_app(root, poll_s=0, lease_s=lease_s)) as still:
        first = leases.held_versions(root)
        assert set(first) == {1, 2}
        remove_items(root, ids=[ids[1]])  # version 3: served by nobody
        remove_items(root, ids=[ids[2]])  # version 4: the latest
        # Wait until both first leases have lapsed and both servers hold renewed ones.
        deadline = time.time() + 60
        while True:
            now = time.time()
            held = leases.held_versions(root)
            if now > max(first.values()) + 0.5 and all(held.get(v, 0) > now + 1 for v in (1, 2)):
                break
            assert time.time() < deadline, f"leases not renewed: {held} at {now}, first {first}"
            time.sleep(0.2)
        out = collect_garbage(root, keep=1)
        assert out["deleted_versions"] == [3] and out["kept_versions"] == [1, 2, 4]
        for v in (1, 2):
            Memory.open(root, v).close()  # every file there, checksums verified
        assert ids[0] in _ids_served(pinned.url, x[:1]) and ids[0] not in _ids_served(still.url, x[:1])
        assert httpx.get(pinned.url + "/v1/health").json()["last_lease_error"] is None


def test_lease_renewal_holds_no_lock_while_it_writes(tmp_path, monkeypatch):
    """A lease write that hangs (slow storage) must not stall queries: they never wait for it."""
    root = str(tmp_path / "m")
    x, _, _ = make_memory(root, n=60)
    served = ServedMemory(root, lease_s=60)
    entered, release = threading.Event(), threading.Event()
    real_acquire = leases.acquire

    def slow_acquire(*args, **kwargs):
        entered.set()
        assert release.wait(60), "the test never let the write finish"
        return real_acquire(*args, **kwargs)

    monkeypatch.setattr(served_module.leases, "acquire", slow_acquire)
    renewed = []
    renewer = threading.Thread(target=lambda: renewed.append(served.renew_lease()), daemon=True)
    try:
        before = served._slot.mem.lease
        renewer.start()
        assert entered.wait(30)
        answered = []

        def query():
            with served.use() as mem:
                answered.append(mem.search(x[:3], 3).ids[:, 0].tolist())

        q = threading.Thread(target=query, daemon=True)
        q.start()
        q.join(30)
        assert answered and not release.is_set() and renewer.is_alive()  # answered while the write hung
        release.set()
        renewer.join(30)
        assert renewed == [True] and served._slot.mem.lease != before
        assert list(leases.held_versions(root)) == [1]
        assert len(list((tmp_path / "m" / "leases").iterdir())) == 1  # the old lease was removed
    finally:
        release.set()
        served.close()
    assert np.asarray(answered[0]).shape == (3,)


def test_a_lost_publish_race_is_a_409_that_publishes_nothing(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from memory.manifest import ConcurrentUpdate

    root = str(tmp_path / "m")
    _, _, ids = make_memory(root, n=60)

    def lost(root, **kwargs):
        raise ConcurrentUpdate(root, 2, "a 'remove' derived from version 1")

    monkeypatch.setattr("memory.mutations.remove_items", lost)
    client = TestClient(create_app(root, admin_token=TOKEN, poll_s=0))
    r = client.post("/v1/admin/remove", json={"ids": [ids[0]]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409 and "published meanwhile" in r.json()["error"], r.text
    assert mf.list_versions(root) == [1] and client.get("/v1/info").json()["version"] == 1
