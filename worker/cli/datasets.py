"""``hipp datasets upload|list|show|delete``: a client for the API's data sets (httpx), like ``hipp jobs``.

``upload`` creates the data set, sends the archive (to the signed upload URL the API answers, or with
``--direct`` as the body of ``PUT /datasets/{id}/archive``; a large archive part by part to the presigned
part URLs of an S3 multipart upload), completes the upload and, with ``--wait``, follows
validation until the data set is ready or invalid. ``--s3-uri`` references an archive already in the
deployment's bucket instead. Reads ``HIPP_API_URL`` and ``HIPP_API_KEY`` (or ``--url`` / ``--key``).
Imports neither torch nor the database.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from worker.cli.jobs import ApiClientError, Client, _client, _print, _run

KINDS = ("images", "pope", "scienceqa", "conversations")
SETTLED = ("ready", "invalid")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ds = sub.add_parser("datasets", help="upload and manage data sets on a HiPP-Prune service")
    ds.add_argument("--url", default=os.environ.get("HIPP_API_URL", "http://127.0.0.1:8000"))
    ds.add_argument("--key", default=os.environ.get("HIPP_API_KEY"), help="API key (default $HIPP_API_KEY)")
    actions = ds.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")

    up = actions.add_parser("upload", help="create a data set from an archive (tar, tar.gz or zip) and validate it")
    up.add_argument("archive", nargs="?", type=Path, help="the archive to upload (not with --s3-uri)")
    up.add_argument("--kind", required=True, choices=KINDS)
    up.add_argument("--name", help="default: the archive's file name")
    up.add_argument("--s3-uri", help="an archive already in the deployment's bucket: s3://BUCKET/KEY")
    up.add_argument("--direct", action="store_true", help="send a small archive in the request body")
    up.add_argument("--wait", action="store_true", help="follow validation until ready or invalid")
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


def send_archive(client: Client, dataset: dict[str, Any], archive: Path, direct: bool) -> dict[str, Any]:
    """Upload ``archive`` for a data set in state ``uploading``; returns it once validation is queued."""
    size = archive.stat().st_size
    if direct:
        return client.request(  # type: ignore[no-any-return]
            "PUT", f"/datasets/{dataset['id']}/archive", content=archive.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
    target = dataset["upload"]
    if size > target["max_bytes"]:
        raise ApiClientError(f"{archive} holds {size} bytes, more than the {target['max_bytes']} this upload takes")
    if target.get("parts"):
        body = {"upload_id": target["upload_id"], "parts": put_parts(target, archive)}
        return client.request("POST", f"/datasets/{dataset['id']}/complete", json=body)  # type: ignore[no-any-return]
    with archive.open("rb") as f:
        # An explicit length: presigned S3 PUTs refuse chunked bodies.
        _put(target["url"], f, size)
    return client.request("POST", f"/datasets/{dataset['id']}/complete")  # type: ignore[no-any-return]


def put_parts(target: dict[str, Any], archive: Path) -> list[dict[str, Any]]:
    """PUT each part of a multipart upload to its URL; the parts' numbers and ETags, for completing."""
    done = []
    with archive.open("rb") as f:
        for part in target["parts"]:
            chunk = f.read(target["part_size"])
            etag = _put(part["url"], chunk, len(chunk)).headers.get("ETag")
            if not etag:
                raise ApiClientError(f"the store answered part {part['number']} without an ETag")
            done.append({"number": part["number"], "etag": etag})
            print(f"part {part['number']}/{len(target['parts'])} uploaded", file=sys.stderr)
    return done


def _put(url: str, content: Any, size: int) -> Any:
    import httpx

    r = httpx.put(url, content=content, headers={"Content-Length": str(size)}, timeout=None)
    if r.status_code >= 300:
        raise ApiClientError(f"upload to the signed URL failed: HTTP {r.status_code} {r.text[:300]}")
    return r


def wait_for_validation(client: Client, dataset_id: str, timeout: float, interval: float = 1.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        dataset: dict[str, Any] = client.request("GET", f"/datasets/{dataset_id}")
        if dataset["state"] in SETTLED:
            return dataset
        if time.monotonic() >= deadline:
            raise ApiClientError(f"dataset {dataset_id} still {dataset['state']} after {timeout:g}s")
        time.sleep(interval)


def cmd_upload(args: argparse.Namespace) -> int:
    if (args.archive is None) == (args.s3_uri is None):
        print("hipp: error: give an archive file or --s3-uri s3://BUCKET/KEY (one of them)", file=sys.stderr)
        return 2
    if args.archive is not None and not args.archive.is_file():
        print(f"hipp: error: {args.archive} is not a file", file=sys.stderr)
        return 2

    def go() -> int:
        client = _client(args)
        source = {"s3_uri": args.s3_uri} if args.s3_uri else {"upload": True}
        name = args.name or (args.archive.name if args.archive is not None else args.s3_uri.rsplit("/", 1)[-1])
        body: dict[str, Any] = {"kind": args.kind, "name": name, "source": source}
        if args.archive is not None and not args.direct:
            body["size"] = args.archive.stat().st_size  # a large archive is then uploaded in parts
        dataset = client.request("POST", "/datasets", json=body)
        print(dataset["id"])
        if args.archive is not None:
            dataset = send_archive(client, dataset, args.archive, args.direct)
        if not args.wait:
            return 0
        dataset = wait_for_validation(client, dataset["id"], args.timeout)
        _print({k: dataset[k] for k in ("state", "counts", "reasons", "sha256", "size")})
        return 0 if dataset["state"] == "ready" else 1

    return _run(go)


def cmd_list(args: argparse.Namespace) -> int:
    def go() -> None:
        params: dict[str, Any] = {"limit": args.limit}
        if args.cursor:
            params["cursor"] = args.cursor
        page = _client(args).request("GET", "/datasets", params=params)
        if args.json:
            _print(page)
            return
        for d in page["items"]:
            print(f"{d['id']}  {d['state']:<10} {d['kind']:<13} {d['name']}  {d['created_at']}")
        if page["next_cursor"]:
            print(f"more: --cursor {page['next_cursor']}", file=sys.stderr)

    return _run(go)


def cmd_show(args: argparse.Namespace) -> int:
    return _run(lambda: _print(_client(args).request("GET", f"/datasets/{args.dataset_id}")))


def cmd_delete(args: argparse.Namespace) -> int:
    def go() -> None:
        r = _client(args).send("DELETE", f"/datasets/{args.dataset_id}")
        if r.status_code >= 400:
            Client._raise(r)
        print("deleted")

    return _run(go)
