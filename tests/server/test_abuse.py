"""Abuse against a LIVE server, once per store: oversized fields, too many workers and sources,
records over the byte limit, a writer changing someone else's record, a poisoned record in
Redis, random bytes on every method. After each, nothing stored is lost or corrupted and the
server keeps answering.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.errors import ServerError
from sglang_mx.records import SourceStatus
from sglang_mx.server.limits import (MAX_BLOB_BYTES, MAX_ID_CHARS, MAX_MAP_ENTRIES, MAX_MAP_KEY_CHARS,
                                     MAX_MAP_VALUE_CHARS, MAX_TEXT_CHARS)

pb = wire.messages
BASE = 0x7F00_0000_0000
ALICE, BOB, READER = "alice-token-0123", "bob-token-4567", "reader-token-89ab"
METHODS = ("PublishMetadata", "ListSources", "GetMetadata", "UpdateStatus")


@pytest.fixture(params=["memory", "redis"])
def store_options(request) -> dict:
    if request.param == "memory":
        return {"store": "memory"}
    return {"store": "redis", "redis_url": request.getfixturevalue("redis_server").url,
            "redis_prefix": request.getfixturevalue("redis_prefix")}


@pytest.fixture
def tokens(tmp_path) -> dict:
    writers, readers = tmp_path / "writers", tmp_path / "readers"
    writers.write_text(f"alice {ALICE}\nbob {BOB}\n")
    readers.write_text(f"{READER}\n")
    writers.chmod(0o600)
    readers.chmod(0o600)
    return {"writer_token_file": str(writers), "reader_token_file": str(readers)}


@pytest.fixture
def live(make_server, store_options, tokens):
    """(server, alice's client, a stub with alice's token, the record alice published before the abuse)."""
    server = make_server(max_workers_per_source=4, max_sources=3, max_record_mb=1, **store_options, **tokens)
    client = MetadataClient(server.address, auth_token=ALICE, timeout_s=10)
    kept = client.publish(_identity("org/kept"), _worker(50), "kept")
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    yield server, client, wire.P2pServiceStub(channel), kept
    channel.close()
    client.close()


def _identity(model: str = "org/abused"):
    from tests.conftest import sample_identity

    return sample_identity(model_name=model)


def _worker(n: int, rank: int = 0):
    from tests.conftest import sample_worker

    return sample_worker(worker_rank=rank, n_tensors=n)


def _request(model: str = "org/abused", worker_id: str = "w0", n: int = 3) -> pb.PublishMetadataRequest:
    return pb.PublishMetadataRequest(identity=wire.identity_to_pb(_identity(model)),
                                     worker=wire.worker_to_pb(_worker(n)), worker_id=worker_id)


def _as(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def _intact(client: MetadataClient, kept: str) -> None:
    """The record published before the abuse is whole, and the server answers."""
    stored = client.get_metadata(kept, "kept")
    assert stored is not None
    assert stored.identity == _identity("org/kept")
    assert stored.worker.tensors == _worker(50).tensors
    assert stored.worker.status == SourceStatus.READY
    assert [r.worker_id for r in client.list_sources(_identity("org/kept"), status=SourceStatus.READY)] == ["kept"]


# --- oversized fields ---------------------------------------------------------------------------------

def _set(path: str, value):
    def edit(request):
        *parents, last = path.split(".")
        target = request
        for name in parents:
            target = getattr(target, name)
        setattr(target, last, value)
    return edit


OVERSIZED = {
    "worker_id": (_set("worker_id", "w" * (MAX_ID_CHARS + 1)), "worker_id is 1025 characters long"),
    "pod_name": (_set("pod_name", "p" * (MAX_TEXT_CHARS + 1)), "pod_name is 257 characters"),
    "model_name": (_set("identity.model_name", "m" * (MAX_ID_CHARS + 1)), "identity.model_name is 1025"),
    "dtype": (_set("identity.dtype", "d" * (MAX_TEXT_CHARS + 1)), "identity.dtype is 257"),
    "revision": (_set("identity.revision", "r" * 5000), "identity.revision is 5000"),
    "extra_parameters entries": (lambda r: r.identity.extra_parameters.update(
        {f"k{i}": "v" for i in range(MAX_MAP_ENTRIES + 1)}), f"identity.extra_parameters has {MAX_MAP_ENTRIES + 1} "
                                                             f"entries; the limit is {MAX_MAP_ENTRIES}"),
    "extra_parameters key": (lambda r: r.identity.extra_parameters.update({"k" * (MAX_MAP_KEY_CHARS + 1): "v"}),
                             "identity.extra_parameters key is 257 characters"),
    "extra_parameters value": (lambda r: r.identity.extra_parameters.update({"k": "v" * (MAX_MAP_VALUE_CHARS + 1)}),
                               "identity.extra_parameters['k'] is 1025 characters"),
    "session id": (_set("worker.transfer_engine_session_id", "h" * 300), "worker.transfer_engine_session_id is 300"),
    "accelerator": (_set("worker.accelerator", "a" * 300), "worker.accelerator is 300"),
    "topology entries": (lambda r: r.worker.topology.update({f"k{i}": "v" for i in range(100)}),
                         "worker.topology has 100 entries"),
    "topology value": (lambda r: r.worker.topology.update({"node": "n" * 2000}), "worker.topology['node'] is 2000"),
    "nixl blob": (_set("worker.nixl_metadata", b"x" * (MAX_BLOB_BYTES + 1)), "worker.nixl_metadata is 1048577 bytes"),
    "tensor name": (lambda r: r.worker.tensor_source.tensors.add(name="t" * 2000, addr=BASE, size=8),
                    "is 2000 characters long; the limit is 1024"),
    "tensor dtype": (lambda r: r.worker.tensor_source.tensors.add(name="x", addr=BASE, size=8, dtype="f" * 300),
                     "dtype of tensor 'x' is 300 characters long"),
    "record bytes": (lambda r: r.worker.tensor_source.tensors.extend(
        pb.TensorDescriptor(name=f"model.layers.{i}.{'x' * 200}", addr=BASE + i * 8, size=8) for i in range(6000)),
        "the limit is 1048576 (--max-record-mb)"),
}


@pytest.mark.parametrize("case", list(OVERSIZED), ids=list(OVERSIZED))
def test_oversized_fields_are_invalid_argument_and_nothing_is_stored(live, case):
    server, client, stub, kept = live
    edit, says = OVERSIZED[case]
    request = _request()
    edit(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.PublishMetadata(request, timeout=30, metadata=_as(ALICE))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert says in info.value.details()
    assert client.list_sources(_identity()) == []
    _intact(client, kept)


def test_too_many_workers_and_sources_are_refused(live):
    server, client, stub, kept = live
    for i in range(4):  # the limit is 4 workers per source
        client.publish(_identity(), _worker(2), f"w{i}")
    with pytest.raises(ServerError) as info:
        client.publish(_identity(), _worker(2), "w4")
    assert info.value.code == "RESOURCE_EXHAUSTED" and "max-workers-per-source 4" in str(info.value)
    client.publish(_identity(), _worker(3), "w3")  # replacing one of them is fine
    client.publish(_identity("org/third"), _worker(2), "w0")  # sources: kept, abused, third = 3
    with pytest.raises(ServerError) as info:
        client.publish(_identity("org/fourth"), _worker(2), "w0")
    assert info.value.code == "RESOURCE_EXHAUSTED" and "max-sources 3" in str(info.value)
    assert sorted(r.worker_id for r in client.list_sources(_identity())) == ["w0", "w1", "w2", "w3"]
    _intact(client, kept)


# --- other writers, readers ---------------------------------------------------------------------------

def test_a_writer_cannot_change_another_writers_record(live):
    server, alice, stub, kept = live
    source = alice.publish(_identity(), _worker(5), "w0")
    with MetadataClient(server.address, auth_token=BOB, timeout_s=10) as bob:
        with pytest.raises(ServerError) as info:
            bob.publish(_identity(), _worker(7), "w0")
        assert info.value.code == "PERMISSION_DENIED"
        assert "'w0' of source" in str(info.value) and "published by another writer" in str(info.value)
        with pytest.raises(ServerError) as info:
            bob.update_status(source, "w0", 0, SourceStatus.STALE)
        assert info.value.code == "PERMISSION_DENIED"
        bob.publish(_identity(), _worker(7), "bob-w")  # his own records are his to change
        bob.update_status(source, "bob-w", 0, SourceStatus.STALE)
    got = alice.get_metadata(source, "w0")
    assert got.worker.tensors == _worker(5).tensors and got.worker.status == SourceStatus.READY
    alice.update_status(source, "w0", 0, SourceStatus.INITIALIZING)
    _intact(alice, kept)


@pytest.mark.parametrize("rpc", ["PublishMetadata", "UpdateStatus"])
def test_a_reader_cannot_write(live, rpc):
    server, client, stub, kept = live
    request = _request() if rpc == "PublishMetadata" else pb.UpdateStatusRequest(
        mx_source_id=kept, worker_id="kept", worker_rank=0, status=pb.SOURCE_STATUS_STALE)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request, timeout=10, metadata=_as(READER))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "a reader token may call ListSources and GetMetadata only" in info.value.details()
    with MetadataClient(server.address, auth_token=READER, timeout_s=10) as reader:
        _intact(reader, kept)  # and reading works


def test_a_poisoned_record_does_not_break_other_listings(live, store_options):
    """An unreadable record (Redis written by something else) is skipped; the biggest record the
    limits allow, listed beside the others, still fits an answer."""
    server, client, stub, kept = live
    source = client.publish(_identity(), _worker(2), "big-topology")
    request = _request(worker_id="big-topology")
    request.worker.topology.update({f"k{i:03d}" + "k" * 250: "v" * MAX_MAP_VALUE_CHARS for i in range(64)})
    stub.PublishMetadata(request, timeout=10, metadata=_as(ALICE))
    if store_options["store"] == "redis":
        import redis

        r = redis.Redis.from_url(store_options["redis_url"])
        client.publish(_identity(), _worker(2), "poisoned")
        key = f"{store_options['redis_prefix']}rec:{len(source)}:{source}:poisoned"
        r.hset(key, mapping={"topology": b"\xff not json", "rank": b"zero"})
        r.close()
    everything = client.list_sources()
    assert {"kept", "big-topology"} <= {ref.worker_id for ref in everything}
    assert "poisoned" not in {ref.worker_id for ref in everything}
    _intact(client, kept)


# --- random bytes on every method -----------------------------------------------------------------------

def test_random_bytes_on_every_method_leave_the_server_serving(live):
    server, client, stub, kept = live
    channel = grpc.insecure_channel(server.address)
    raw = {m: channel.unary_unary(f"/{wire.SERVICE_NAME}/{m}") for m in METHODS}
    valid = {m: getattr(pb, f"{m}Request")().SerializeToString() for m in METHODS}
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
    @given(method=st.sampled_from(METHODS), body=st.one_of(st.binary(max_size=4096), st.binary(max_size=64).map(
        lambda b: b"\x0a" + bytes([len(b)]) + b)), token=st.sampled_from([ALICE, BOB, READER, "nope"]))
    def storm(method, body, token):
        try:
            raw[method](body, timeout=10, metadata=_as(token))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        if token == "nope":
            assert code == grpc.StatusCode.UNAUTHENTICATED
        else:
            assert code in allowed, (method, body, code)

    try:
        storm()
        for m in METHODS:  # an empty request of each kind is answered, not crashed on
            try:
                raw[m](valid[m], timeout=10, metadata=_as(ALICE))
            except grpc.RpcError as e:
                assert e.code() in allowed
    finally:
        channel.close()
    _intact(client, kept)


# --- per-principal quotas -------------------------------------------------------------------------------

def test_one_writer_cannot_fill_the_server(make_server, store_options, tokens):
    """Each token has its own quota of records and bytes: alice at hers is refused RESOURCE_EXHAUSTED,
    naming her use, the limit and the flag; bob publishes on, and alice may still republish."""
    server = make_server(max_records_per_principal=3, max_mb_per_principal=1, **store_options, **tokens)
    channel = grpc.insecure_channel(server.address)
    stub = wire.P2pServiceStub(channel)
    try:
        with MetadataClient(server.address, auth_token=ALICE, timeout_s=10) as alice, \
                MetadataClient(server.address, auth_token=BOB, timeout_s=10) as bob:
            for i in range(3):
                alice.publish(_identity(), _worker(2), f"alice{i}")
            with pytest.raises(ServerError) as info:
                alice.publish(_identity("org/other"), _worker(2), "alice3")
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert ("writer 'alice' holds 3 records; 1 more would pass the limit of 3 per writer (raise it with "
                    "--max-records-per-principal)") in str(info.value)
            alice.publish(_identity(), _worker(5), "alice0")  # republishing is not a new record
            big = _request(worker_id="bob-big", n=0)
            big.worker.tensor_source.tensors.extend(pb.TensorDescriptor(
                name=f"model.layers.{i}.{'x' * 200}", addr=BASE + i * 8, size=8) for i in range(3000))
            assert stub.PublishMetadata(big, timeout=30, metadata=_as(BOB)).success  # 0.7 MB of bob's 1 MB
            big.worker_id = "bob-big-2"
            with pytest.raises(grpc.RpcError) as info:
                stub.PublishMetadata(big, timeout=30, metadata=_as(BOB))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "writer 'bob' holds" in info.value.details()
            assert "bytes of records" in info.value.details() and "--max-mb-per-principal" in info.value.details()
            bob.publish(_identity(), _worker(2), "bob-small")
            assert sorted(r.worker_id for r in bob.list_sources()) == [
                "alice0", "alice1", "alice2", "bob-big", "bob-small"]
    finally:
        channel.close()
