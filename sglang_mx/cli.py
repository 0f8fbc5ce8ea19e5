"""The `sglang-mx` command."""

from __future__ import annotations

import argparse
import logging
import sys

from sglang_mx.errors import ConfigError, MxError
from sglang_mx.server.options import SERVING_BULK_NICE, STORE_KINDS, ServerOptions


def _add_server(sub) -> None:
    d = ServerOptions()  # the CLI's defaults are the options' own, but for --bulk-nice (SERVING_BULK_NICE)
    p = sub.add_parser("server", help="run the metadata server (ModelExpress P2pService)")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    p.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout_s, metavar="S",
                   help=f"a READY/INITIALIZING record silent this long becomes STALE (default {d.heartbeat_timeout_s:g})")
    p.add_argument("--reaper-interval", type=float, default=d.reaper_interval_s, metavar="S",
                   help=f"how often the reaper scans (default {d.reaper_interval_s:g})")
    p.add_argument("--gc-timeout", type=float, default=d.gc_timeout_s, metavar="S",
                   help=f"STALE records older than this are deleted (default {d.gc_timeout_s:g})")
    p.add_argument("--max-message-mb", type=int, default=d.max_message_mb,
                   help=f"largest gRPC message (default {d.max_message_mb})")
    p.add_argument("--store", choices=STORE_KINDS, default=d.store,
                   help=f"where records live: memory (this process) or redis (shared by replicas, "
                        f"survives restarts); default {d.store}")
    p.add_argument("--redis-url", default=d.redis_url, metavar="URL",
                   help=f"Redis for --store redis (default {d.redis_url}; rediss:// for TLS)")
    p.add_argument("--redis-prefix", default=d.redis_prefix, metavar="PREFIX",
                   help=f"prefix of every Redis key (default {d.redis_prefix!r}); servers sharing records use "
                        "the same one")
    p.add_argument("--redis-cache-mb", type=int, default=d.redis_cache_mb, metavar="MB",
                   help=f"record blobs this server keeps from Redis, checked against the record's version on "
                        f"every read (default {d.redis_cache_mb}; 0: none)")
    p.add_argument("--max-tensors", type=int, default=d.max_tensors, metavar="N",
                   help=f"most tensor descriptors one worker may publish (default {d.max_tensors})")
    p.add_argument("--max-record-mb", type=int, default=d.max_record_mb, metavar="MB",
                   help=f"largest published worker record, serialized (default {d.max_record_mb})")
    p.add_argument("--max-workers-per-source", type=int, default=d.max_workers_per_source, metavar="N",
                   help=f"most workers one source may hold (default {d.max_workers_per_source})")
    p.add_argument("--max-sources", type=int, default=d.max_sources, metavar="N",
                   help=f"most sources the server holds (default {d.max_sources})")
    p.add_argument("--max-records-per-principal", type=int, default=d.max_records_per_principal, metavar="N",
                   help=f"most records one writer (token, or its NAME) may hold; without tokens, all writers "
                        f"together (default {d.max_records_per_principal})")
    p.add_argument("--max-mb-per-principal", type=int, default=d.max_mb_per_principal, metavar="MB",
                   help=f"most MB of records one writer may hold, serialized (default {d.max_mb_per_principal})")
    p.add_argument("--workers", type=int, default=d.workers, metavar="N",
                   help=f"threads answering GetMetadata and PublishMetadata (default 2 for memory, 4 for redis); "
                        f"listings and heartbeats have {d.fast_workers} of their own")
    p.add_argument("--bulk-nice", type=int, default=SERVING_BULK_NICE, metavar="N",
                   help=f"lower the --workers threads' CPU priority by N, 0-19 (default {SERVING_BULK_NICE}; Linux): "
                        "on a busy CPU, listings and heartbeats run before big answers")
    p.add_argument("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs, metavar="N",
                   help=f"calls in progress past this are refused RESOURCE_EXHAUSTED (default {d.max_concurrent_rpcs})")
    p.add_argument("--max-watchers", type=int, default=d.max_watchers, metavar="N",
                   help=f"open WatchSources streams past this are refused RESOURCE_EXHAUSTED (default "
                        f"{d.max_watchers}); an open watch holds no thread")
    p.add_argument("--auth-token-file", metavar="FILE",
                   help="tokens that may call every RPC, one per line ('TOKEN' or 'NAME TOKEN'); every "
                        "P2pService call must then carry 'authorization: Bearer <token>' (health stays open)")
    p.add_argument("--writer-token-file", metavar="FILE",
                   help="writer tokens (PublishMetadata, UpdateStatus, and reading), one per line")
    p.add_argument("--reader-token-file", metavar="FILE",
                   help="reader tokens (ListSources, GetMetadata only), one per line")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without any token (anyone who reaches the port may "
                        "publish, change and read records)")
    p.add_argument("--allow-plaintext-tokens", action="store_true",
                   help="take tokens without TLS on a non-loopback --host (when something else encrypts the "
                        "network: a TLS-terminating proxy, a mesh)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="FILE",
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)")


def _add_sources(sub) -> None:
    p = sub.add_parser("sources", help="list every published worker of a metadata server (the fleet view)")
    p.add_argument("--url", default="localhost:8001", help="metadata server (default localhost:8001)")
    p.add_argument("--model", metavar="NAME", help="only workers of this model")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="print again every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--auth-token-file", metavar="FILE", help="file holding the server's bearer token")
    p.add_argument("--tls-ca-file", metavar="FILE", help="PEM CA bundle: connect with TLS")
    p.add_argument("--tls-cert-file", metavar="FILE", help="this client's PEM certificate (mutual TLS)")
    p.add_argument("--tls-key-file", metavar="FILE", help="this client's PEM key (mutual TLS)")
    p.add_argument("--allow-plaintext-token", action="store_true",
                   help="send the token without TLS to a non-loopback server")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per-call deadline (default 10)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="server + seed + target on this machine, without SGLang")
    p.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size (default 1.0)")
    p.add_argument("--protocol", default="tcp", help="Mooncake protocol (default tcp)")
    p.add_argument("--host", default="127.0.0.1", help="address the processes advertise (default 127.0.0.1)")


def _sources(args) -> int:
    from sglang_mx import fleet
    from sglang_mx.credentials import read_token_file
    from sglang_mx.client import MetadataClient

    if args.watch is not None and args.watch <= 0:
        raise ConfigError(f"--watch {args.watch:g} must be a positive number of seconds")
    token = read_token_file(args.auth_token_file, what="--auth-token-file") if args.auth_token_file else None
    with MetadataClient(args.url, timeout_s=args.timeout, auth_token=token, tls_ca_file=args.tls_ca_file,
                        tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
                        allow_plaintext_token=args.allow_plaintext_token) as client:
        if args.watch is None:
            fleet.show(client, sys.stdout, model_name=args.model, as_json=args.json)
        else:
            fleet.watch(client, sys.stdout, interval_s=args.watch, model_name=args.model, as_json=args.json)
    return 0


def _add_patch(sub) -> None:
    p = sub.add_parser("patch", help="patch an SGLang release without the plugin system (0.5.10)",
                       description="Route SGLang 0.5.10's modelexpress backend to sglang-mx (the patch ships in "
                                   "sglang_mx/sglang/patches/); "
                                   "SGLang 0.5.15 and later need no patch. check exits 0 when applied "
                                   "or not needed, 1 when not applied, 2 on conflicts or errors.")
    p.add_argument("action", choices=("apply", "check", "revert"))
    p.add_argument("--site-packages", metavar="DIR",
                   help="the site-packages holding SGLang (default: this Python's)")


def _run_patch(args) -> int:
    from sglang_mx.sglang import patching

    install = patching.find_sglang(args.site_packages)
    report = getattr(patching, args.action)(install)
    print(report)
    if args.action == "check":
        return {patching.State.NOT_APPLIED: 1, patching.State.CONFLICTS: 2}.get(report.state, 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-mx", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_server(sub)
    _add_sources(sub)
    _add_demo(sub)
    _add_patch(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "server":
            from sglang_mx.server import serve_forever

            serve_forever(ServerOptions(
                host=args.host, port=args.port, heartbeat_timeout_s=args.heartbeat_timeout,
                reaper_interval_s=args.reaper_interval, gc_timeout_s=args.gc_timeout,
                max_message_mb=args.max_message_mb, store=args.store, redis_url=args.redis_url,
                redis_prefix=args.redis_prefix, redis_cache_mb=args.redis_cache_mb, max_tensors=args.max_tensors,
                max_record_mb=args.max_record_mb, max_workers_per_source=args.max_workers_per_source,
                max_sources=args.max_sources, max_records_per_principal=args.max_records_per_principal,
                max_mb_per_principal=args.max_mb_per_principal, max_concurrent_rpcs=args.max_concurrent_rpcs,
                max_watchers=args.max_watchers,
                workers=args.workers, bulk_nice=args.bulk_nice,
                auth_token_file=args.auth_token_file,
                writer_token_file=args.writer_token_file, reader_token_file=args.reader_token_file,
                allow_unauthenticated=args.allow_unauthenticated,
                allow_plaintext_tokens=args.allow_plaintext_tokens, tls_cert_file=args.tls_cert,
                tls_key_file=args.tls_key, tls_client_ca_file=args.tls_client_ca, metrics_port=args.metrics_port,
            ))
            return 0
        if args.command == "sources":
            return _sources(args)
        if args.command == "demo":
            from sglang_mx.demo import run_demo

            return run_demo(args.size_gb, args.protocol, args.host)
        if args.command == "patch":
            return _run_patch(args)
    except MxError as e:
        print(f"sglang-mx: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
