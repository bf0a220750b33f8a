"""``hipp datasets upload|list|show|delete``: the API's data sets through ``hipp_client``, like ``hipp jobs``.

``upload`` creates the data set, sends the archive (to the signed upload URL the API answers, or with
``--direct`` as the body of ``PUT /datasets/{id}/archive``; a large archive part by part to the presigned
part URLs of an S3 multipart upload), completes the upload and, with ``--wait``, follows
validation until the data set is ready or invalid. ``--s3-uri`` references an archive already in the
deployment's bucket instead. Reads ``HIPP_API_URL`` and ``HIPP_API_KEY`` (or ``--url`` / ``--key``).
Imports neither torch nor the database.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from worker.cli.jobs import _client, _print, _run, add_service_arguments


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ds = sub.add_parser("datasets", help="upload and manage data sets on a HiPP-Prune service")
    add_service_arguments(ds)
    actions = ds.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")

    up = actions.add_parser("upload", help="create a data set from an archive (tar, tar.gz or zip) and validate it")
    up.add_argument("archive", nargs="?", type=Path, help="the archive to upload (not with --s3-uri)")
    up.add_argument("--kind", required=True, help="images, pope, scienceqa or conversations (the API checks it)")
    up.add_argument("--name", help="default: the archive's file name")
    up.add_argument("--s3-uri", help="an archive already in the deployment's bucket: s3://BUCKET/KEY")
    up.add_argument("--direct", action="store_true", help="send a small archive in the request body")
    up.add_argument("--wait", action="store_true", help="follow validation until ready or invalid")
    up.add_argument("--id-only", action="store_true",
                    help="wait until ready and print only the id (for scripts); exit 1 if it is invalid")
    up.add_argument("--timeout", type=float, default=600.0, help="with --wait: seconds")
    up.set_defaults(func=cmd_upload)

    ls = actions.add_parser("list", help="list data sets, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--cursor")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="show a data set (state, counts, reasons)")
    show.add_argument("dataset_id")
    show.set_defaults(func=cmd_show)

    rm = actions.add_parser("delete", help="delete a data set and its stored archive")
    rm.add_argument("dataset_id")
    rm.set_defaults(func=cmd_delete)


def _summary(dataset: Any) -> dict[str, Any]:
    return {"id": dataset.id, "state": dataset.state, "counts": dataset.counts, "reasons": dataset.reasons,
            "sha256": dataset.sha256, "size": dataset.size}


def cmd_upload(args: argparse.Namespace) -> int:
    if (args.archive is None) == (args.s3_uri is None):
        print("hipp: error: give an archive file or --s3-uri s3://BUCKET/KEY (one of them)", file=sys.stderr)
        return 2
    if args.archive is not None and not args.archive.is_file():
        print(f"hipp: error: {args.archive} is not a file", file=sys.stderr)
        return 2

    def go() -> int:
        client = _client(args)
        name = args.name or (args.archive.name if args.archive is not None else args.s3_uri.rsplit("/", 1)[-1])
        size = args.archive.stat().st_size if args.archive is not None and not args.direct else None
        dataset = client.create_dataset(args.kind, name, s3_uri=args.s3_uri, size=size)
        if not args.id_only:
            print(dataset.id)
        if args.archive is not None:
            dataset = client.upload_dataset(
                dataset, args.archive, direct=args.direct,
                on_part=lambda n, total: print(f"part {n}/{total} uploaded", file=sys.stderr))
        if not (args.wait or args.id_only):
            return 0
        dataset = client.wait_dataset(dataset.id, timeout=args.timeout)
        if args.id_only:  # for scripts: VAR=$(hipp datasets upload ... --id-only), the id once it is ready
            if dataset.state != "ready":
                print(f"hipp: error: data set {dataset.id} is {dataset.state}: "
                      f"{'; '.join(dataset.raw.get('reasons') or [])}", file=sys.stderr)
                return 1
            print(dataset.id)
            return 0
        _print(_summary(dataset))
        return 0 if dataset.state == "ready" else 1

    return _run(go)


def cmd_list(args: argparse.Namespace) -> int:
    def go() -> None:
        page = _client(args).datasets_page(limit=args.limit, cursor=args.cursor)
        if args.json:
            _print(page.raw)
            return
        for d in page.items:
            print(f"{d.id}  {d.state:<10} {d.kind:<13} {d.name}  {d.raw.get('created_at')}")
        if page.next_cursor:
            print(f"more: --cursor {page.next_cursor}", file=sys.stderr)

    return _run(go)


def cmd_show(args: argparse.Namespace) -> int:
    return _run(lambda: _print(_client(args).get_dataset(args.dataset_id).raw))


def cmd_delete(args: argparse.Namespace) -> int:
    def go() -> None:
        _client(args).delete_dataset(args.dataset_id)
        print("deleted")

    return _run(go)
