"""Datasets (issue 17, item 1): every kind uploaded in its official format (built here), validated by the worker's
task run in-process against real Postgres and S3 (moto) or the embedded local store; each unsafe or broken
archive refused with a reason that names what to fix; tenant isolation; delete."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.config import Settings
from app.db import session_factory, session_scope
from app.models import Job
from app.storage import get_storage
from tests.service.conftest import auth
from worker.datasets import validate_dataset

Files = dict[str, bytes]


# --- archives in the official formats ----------------------------------------------------------------------
def png(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def tar_bytes(files: Files, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(files: Files) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def pope_files() -> Files:
    """POPE's official layout: coco_pope_{split}.json (a JSON object per line) next to COCO's val2014/."""
    images = ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"]
    files: Files = {f"pope/val2014/{name}": png(fmt="JPEG") for name in images}
    for split in ("random", "popular", "adversarial"):
        rows = [
            {"question_id": i + 1, "image": images[i % 2], "text": f"Is there a {obj} in the image?", "label": lab}
            for i, (obj, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "no"), ("person", "yes")])
        ]
        files[f"pope/coco_pope_{split}.json"] = jsonl(rows)
    return files


def scienceqa_files() -> Files:
    """ScienceQA's official layout: problems.json, pid_splits.json, images/{split}/{pid}/image.png."""
    problem = {"question": "Which object is red?", "choices": ["ball", "leaf"], "answer": 0, "hint": "",
               "image": "image.png", "task": "closed choice", "split": "test"}
    problems = {"1": problem, "2": {**problem, "split": "train"}, "3": {**problem, "image": None}}
    return {
        "problems.json": json.dumps(problems).encode(),
        "pid_splits.json": json.dumps({"train": ["2"], "val": [], "test": ["1", "3"]}).encode(),
        "images/test/1/image.png": png(),
        "images/train/2/image.png": png(color=(0, 0, 200)),
    }


def conversations_files() -> Files:
    records = [
        {"id": "a", "image": "images/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "No."}]},
        {"id": "b", "image": "images/b.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A blue square."}]},
    ]
    return {"llava_instruct.json": json.dumps(records).encode(), "images/a.png": png(), "images/b.png": png()}


def images_files() -> Files:
    return {"calib/1.png": png(), "calib/2.jpg": png(fmt="JPEG"), "calib/3.png": png((8, 24)), "README.txt": b"x"}


# --- fixtures and helpers -----------------------------------------------------------------------------------
@pytest.fixture
def local_settings(stack_settings: Settings, tmp_path: Path) -> Settings:
    """The embedded deployment's store (a local folder behind HMAC-signed URLs), with the stack's database."""
    return stack_settings.model_copy(update={
        "storage": "local", "storage_dir": tmp_path / "store", "public_url": "http://testserver",
        "dataset_direct_upload_max_bytes": 1024 * 1024, "work_dir": tmp_path / "work",
    })


@pytest.fixture
def local_client(local_settings: Settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(local_settings)) as c:
        yield c


def validate(settings: Settings, dataset_id: str) -> str:
    """The hipp.validate_dataset task's body, in-process."""
    return validate_dataset(dataset_id, settings, session_factory(settings.resolved_database_url),
                            get_storage(settings))


def create(client: Any, key: str, kind: str, **source: Any) -> dict[str, Any]:
    body = {"kind": kind, "name": f"{kind} set", "source": source or {"upload": True}}
    r = client.post("/datasets", json=body, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def upload_direct(client: Any, key: str, kind: str, archive: bytes) -> dict[str, Any]:
    ds = create(client, key, kind)
    assert ds["state"] == "uploading" and ds["upload"]["method"] == "PUT"
    r = client.put(f"/datasets/{ds['id']}/archive", content=archive,
                   headers={**auth(key), "Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "validating"
    return r.json()  # type: ignore[no-any-return]


def validated(client: Any, settings: Settings, key: str, kind: str, archive: bytes) -> dict[str, Any]:
    ds = upload_direct(client, key, kind, archive)
    validate(settings, ds["id"])
    r = client.get(f"/datasets/{ds['id']}", headers=auth(key))
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


def ready_conversations(client: Any, settings: Settings, key: str) -> str:
    """The id of a ready conversations data set of the tenant: what recovery of any model other than the
    testbed needs (``data.recovery``)."""
    ds = validated(client, settings, key, "conversations", zip_bytes(conversations_files()))
    assert ds["state"] == "ready", ds["reasons"]
    return str(ds["id"])


# --- every kind, in its official format ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "archive", "counts"),
    [
        ("images", lambda: tar_bytes(images_files()), {"images": 3}),
        ("pope", lambda: zip_bytes(pope_files()),
         {"questions": {"random": 4, "popular": 4, "adversarial": 4}, "images": 2}),
        ("scienceqa", lambda: tar_bytes(scienceqa_files(), "w"),
         {"problems": {"train": 1, "val": 0, "test": 1}, "images": 2}),
        ("conversations", lambda: zip_bytes(conversations_files()), {"conversations": 2, "turns": 3, "images": 2}),
    ],
)
def test_each_kind_validates_ready_with_counts_and_sha256(  # type: ignore[no-untyped-def]
    client, stack_settings, tenant_key, kind, archive, counts
) -> None:
    data = archive()
    ds = validated(client, stack_settings, tenant_key, kind, data)
    assert ds["state"] == "ready", ds["reasons"]
    assert ds["counts"] == counts and ds["reasons"] == []
    import hashlib

    assert ds["sha256"] == hashlib.sha256(data).hexdigest() and ds["size"] == len(data)


def test_signed_url_upload_to_s3_then_complete(client, stack_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    ds = create(client, tenant_key, "images")
    r = client.post(f"/datasets/{ds['id']}/complete", headers=auth(tenant_key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "archive_missing"
    assert httpx.put(ds["upload"]["url"], content=tar_bytes(images_files())).status_code == 200
    r = client.post(f"/datasets/{ds['id']}/complete", headers=auth(tenant_key))
    assert r.status_code == 202 and r.json()["state"] == "validating"
    assert client.post(f"/datasets/{ds['id']}/complete", headers=auth(tenant_key)).status_code == 409
    assert validate(stack_settings, ds["id"]) == "ready"


def test_signed_url_upload_to_the_local_store(local_client, local_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    ds = create(local_client, tenant_key, "pope")
    url = ds["upload"]["url"]
    assert local_client.put(url.replace("sig=", "sig=0"), content=b"x").status_code == 403
    r = local_client.put(url, content=zip_bytes(pope_files()), headers={"Content-Type": "application/zip"})
    assert r.status_code == 200, r.text
    assert local_client.post(f"/datasets/{ds['id']}/complete", headers=auth(tenant_key)).status_code == 202
    assert validate(local_settings, ds["id"]) == "ready"
    # The upload URL wrote only under the data set's own prefix.
    store = local_settings.resolved_storage_dir
    written = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.name != ".ready"}
    assert written == {f"{_prefixes(local_settings, ds['id'])[0]}archive"}


def test_direct_upload_is_size_capped(local_client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    ds = create(local_client, tenant_key, "images")
    r = local_client.put(f"/datasets/{ds['id']}/archive", content=b"\0" * (1024 * 1024 + 1),
                         headers={**auth(tenant_key), "Content-Type": "application/octet-stream"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = local_client.put(f"/datasets/{ds['id']}/archive", content=b"",
                         headers={**auth(tenant_key), "Content-Type": "application/octet-stream"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_archive"


# --- refused archives --------------------------------------------------------------------------------------
def tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
        ok = tarfile.TarInfo("calib/1.png")
        image = png()
        ok.size = len(image)
        tar.addfile(ok, io.BytesIO(image))
    return buf.getvalue()


def regular(name: str, data: bytes = b"x") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("calib/zeros.png", b"\0" * (16 * 1024 * 1024))
    return buf.getvalue()


def pope_with_broken_line() -> bytes:
    files = pope_files()
    lines = files["pope/coco_pope_random.json"].decode().splitlines()
    row = json.loads(lines[2])
    del row["label"]
    lines[2] = json.dumps(row)
    files["pope/coco_pope_random.json"] = ("\n".join(lines) + "\n").encode()
    return zip_bytes(files)


@pytest.mark.parametrize(
    ("kind", "archive", "fragment"),
    [
        ("images", lambda: tar_with(regular("../x", b"x"), b"x"), "'../x': absolute path or '..' (path traversal)"),
        ("images", lambda: tar_with(regular("/etc/evil", b"x"), b"x"), "'/etc/evil': absolute path"),
        ("images", lambda: tar_with(symlink("calib/link.png", "/etc/passwd")), "calib/link.png: symlink"),
        ("images", bomb, "decompression bomb"),
        ("images", lambda: b"just some bytes", "not a tar or zip archive"),
        ("images", lambda: tar_bytes({"calib/big.png": png((120, 100))}), "calib/big.png: 120x100 pixels"),
        ("images", lambda: tar_bytes({"calib/bad.png": b"not a png"}), "calib/bad.png: cannot be decoded"),
        ("pope", pope_with_broken_line, "pope/coco_pope_random.json line 3: missing 'label'"),
        ("scienceqa", lambda: tar_bytes({k: v for k, v in scienceqa_files().items() if "train" not in k}),
         "images/train/2/image.png: not found"),
        ("conversations", lambda: zip_bytes({"c.json": b'[{"id": "z", "conversations": []}]'}),
         "c.json entry 0 (z): needs alternating human/gpt messages"),
        ("conversations", lambda: zip_bytes({"c.json": json.dumps([{**json.loads(conversations_files()[
            "llava_instruct.json"])[0], "image": "../../../../etc/hostname"}]).encode()}),
         "the image path leaves the archive"),
    ],
)
def test_bad_archives_are_refused_with_a_clear_reason(  # type: ignore[no-untyped-def]
    client, stack_settings, tenant_key, tmp_path, kind, archive, fragment
) -> None:
    settings = stack_settings.model_copy(update={"dataset_max_image_pixels": 10_000, "work_dir": tmp_path / "w"})
    ds = validated(client, settings, tenant_key, kind, archive())
    assert ds["state"] == "invalid" and ds["counts"] == {}
    assert any(fragment in reason for reason in ds["reasons"]), ds["reasons"]
    assert not any(str(tmp_path) in reason for reason in ds["reasons"])  # names relative to the archive
    # Nothing was unpacked anywhere outside the scratch folder, and the scratch folder is gone.
    assert not (tmp_path / "x").exists() and not (tmp_path / "w" / "datasets" / ds["id"]).exists()


# --- s3:// references ----------------------------------------------------------------------------------------
def test_s3_uri_in_the_deployment_bucket_only(client, stack_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    storage = get_storage(stack_settings)
    ref = f"refs/{uuid.uuid4().hex}/sqa.tar"
    storage.put_bytes(ref, tar_bytes(scienceqa_files()))
    for uri in ("s3://another-bucket/sqa.tar", f"s3://{stack_settings.s3_bucket}/", "https://example.com/x.tar",
                f"s3://{stack_settings.s3_bucket}/a/../b.tar"):
        r = client.post("/datasets", json={"kind": "scienceqa", "name": "x", "source": {"s3_uri": uri}},
                        headers=auth(tenant_key))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_s3_uri", r.text
        assert "s3://" in r.json()["error"]["message"]
    r = client.post("/datasets", json={"kind": "scienceqa", "name": "x", "source": {"upload": True, "s3_uri": "s"}},
                    headers=auth(tenant_key))
    assert r.status_code == 422 and "exactly one" in r.json()["error"]["message"]
    r = client.post("/datasets", json={"kind": "pope", "name": "x", "source": {"hub": "lmms-lab/POPE"}},
                    headers=auth(tenant_key))
    assert r.status_code == 422 and "hub data set ids are not accepted yet" in r.json()["error"]["message"]
    ds = create(client, tenant_key, "scienceqa", s3_uri=f"s3://{stack_settings.s3_bucket}/{ref}")
    assert ds["state"] == "validating" and ds["source"] == "s3" and ds["upload"] is None
    assert validate(stack_settings, ds["id"]) == "ready"
    assert client.delete(f"/datasets/{ds['id']}", headers=auth(tenant_key)).status_code == 204
    assert storage.exists(ref)  # the referenced object is the tenant's own: kept


def test_missing_s3_object_is_invalid_not_an_error(client, stack_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    ds = create(client, tenant_key, "images", s3_uri=f"s3://{stack_settings.s3_bucket}/refs/none.tar")
    assert validate(stack_settings, ds["id"]) == "invalid"
    reasons = client.get(f"/datasets/{ds['id']}", headers=auth(tenant_key)).json()["reasons"]
    assert "could not be read from the store" in reasons[0]


# --- listing, isolation, delete ----------------------------------------------------------------------------
def test_list_get_and_tenant_isolation(client, stack_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    from app.security import create_api_key

    ids = [create(client, tenant_key, "images")["id"] for _ in range(3)]
    page = client.get("/datasets", params={"limit": 2}, headers=auth(tenant_key)).json()
    assert [d["id"] for d in page["items"]] == ids[::-1][:2] and page["next_cursor"]
    rest = client.get("/datasets", params={"cursor": page["next_cursor"]}, headers=auth(tenant_key)).json()
    assert [d["id"] for d in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    assert client.get("/datasets", params={"cursor": "!!"}, headers=auth(tenant_key)).status_code == 400
    with session_scope(stack_settings.resolved_database_url) as session:
        other, _ = create_api_key(session, f"other-{uuid.uuid4().hex[:8]}")
    for method in ("get", "delete"):
        r = client.request(method.upper(), f"/datasets/{ids[0]}", headers=auth(other))
        assert r.status_code == 404 and "another tenant" in r.json()["error"]["message"]
    r = client.put(f"/datasets/{ids[0]}/archive", content=b"x",
                   headers={**auth(other), "Content-Type": "application/octet-stream"})
    assert r.status_code == 404
    assert client.get("/datasets", headers=auth(other)).json()["items"] == []


def test_delete_removes_files_and_is_refused_while_a_job_uses_it(  # type: ignore[no-untyped-def]
    client, stack_settings, tenant_key
) -> None:
    ds = validated(client, stack_settings, tenant_key, "images", tar_bytes(images_files()))
    storage = get_storage(stack_settings)
    archive_key = f"{_prefixes(stack_settings, ds['id'])[0]}archive"
    assert storage.exists(archive_key)
    job = client.post("/jobs", json={"model": "tiny-llava", "preference": {"utility": 1}}, headers=auth(tenant_key))
    with session_scope(stack_settings.resolved_database_url) as session:
        row = session.get(Job, uuid.UUID(job.json()["id"]))
        assert row is not None
        row.options = {**row.options, "data": {"calibration": ds["id"]}}
    r = client.delete(f"/datasets/{ds['id']}", headers=auth(tenant_key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_in_use"
    assert r.json()["error"]["detail"]["jobs"] == [job.json()["id"]]
    assert client.post(f"/jobs/{job.json()['id']}/cancel", headers=auth(tenant_key)).status_code == 202
    assert client.delete(f"/datasets/{ds['id']}", headers=auth(tenant_key)).status_code == 204
    assert not storage.exists(archive_key)
    assert client.get(f"/datasets/{ds['id']}", headers=auth(tenant_key)).status_code == 404


def _prefixes(settings: Settings, dataset_id: str) -> list[str]:
    from app.models import Dataset

    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Dataset, uuid.UUID(dataset_id))
        assert row is not None
        return [row.prefix]


# --- the CLI -------------------------------------------------------------------------------------------------
def validate_when_queued(settings: Settings, name: str, timeout: float = 30.0) -> Any:
    """A stand-in light worker: validates the data set called ``name`` once it is ``validating``, in a thread."""
    import threading
    import time

    from sqlalchemy import select

    from app.models import Dataset

    def work() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with session_scope(settings.resolved_database_url) as session:
                ident = session.scalar(
                    select(Dataset.id).where(Dataset.state == "validating", Dataset.name == name)
                )
            if ident is not None:
                validate(settings, str(ident))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_cli_upload_list_show_delete(  # type: ignore[no-untyped-def]
    client, stack_settings, tenant_key, tmp_path, monkeypatch, capsys
) -> None:
    from hipp_client import HippClient
    from worker.cli import datasets as cli
    from worker.cli import main

    def wired(args: Any) -> HippClient:
        client.headers["Authorization"] = f"Bearer {tenant_key}"
        return HippClient("http://testserver", None, http=client)  # the TestClient is an httpx.Client

    monkeypatch.setattr(cli, "_client", wired)
    pope_zip, images_tar = tmp_path / "pope.zip", tmp_path / "calib.tar.gz"
    pope_zip.write_bytes(zip_bytes(pope_files()))
    images_tar.write_bytes(tar_bytes(images_files()))

    # Through the signed S3 URL, then followed until validated.
    name = f"pope-{uuid.uuid4().hex}"
    worker = validate_when_queued(stack_settings, name)
    upload = ["datasets", "upload", "--kind", "pope", "--name", name, str(pope_zip), "--wait", "--timeout", "30"]
    assert main(upload) == 0
    worker.join()
    out = capsys.readouterr().out
    pope_id = out.splitlines()[0]
    assert json.loads(out.split("\n", 1)[1])["counts"]["questions"]["random"] == 4
    # For scripts: --id-only waits and prints the id alone, once the data set is ready.
    scripted = f"pope-{uuid.uuid4().hex}"
    worker = validate_when_queued(stack_settings, scripted)
    assert main(["datasets", "upload", "--kind", "pope", "--name", scripted, str(pope_zip), "--id-only",
                 "--timeout", "30"]) == 0
    worker.join()
    only = capsys.readouterr().out.splitlines()
    assert len(only) == 1 and client.get(f"/datasets/{only[0]}").json()["state"] == "ready"
    # Directly in the body, not waited for.
    assert main(["datasets", "upload", "--kind", "images", "--direct", "--name", "calib", str(images_tar)]) == 0
    images_id = capsys.readouterr().out.strip()
    assert main(["datasets", "list"]) == 0
    listed = capsys.readouterr().out
    assert images_id in listed and "validating" in listed and pope_id in listed and "ready" in listed
    assert main(["datasets", "show", pope_id]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "ready"
    assert main(["datasets", "delete", pope_id]) == 0 and capsys.readouterr().out.strip() == "deleted"
    assert main(["datasets", "show", pope_id]) == 2
    assert "not_found" in capsys.readouterr().err
    assert main(["datasets", "upload", "--kind", "images"]) == 2


def test_a_broker_outage_leaves_nothing_half_done(local_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app

    down = local_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{_closed_port()}/0"})
    with TestClient(create_app(down)) as c:
        ds = create(c, tenant_key, "images")
        r = c.put(f"/datasets/{ds['id']}/archive", content=tar_bytes(images_files()),
                  headers={**auth(tenant_key), "Content-Type": "application/octet-stream"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable", r.text
        assert r.headers["Retry-After"] and "complete again" in r.json()["error"]["message"]
        assert c.get(f"/datasets/{ds['id']}", headers=auth(tenant_key)).json()["state"] == "uploading"
    with TestClient(create_app(local_settings)) as c:  # the broker is back: completing works
        r = c.post(f"/datasets/{ds['id']}/complete", headers=auth(tenant_key))
        assert r.status_code == 202 and r.json()["state"] == "validating"


def test_an_unreachable_object_store_is_a_503_not_a_500(stack_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app

    down = stack_settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{_closed_port()}",
                                             "s3_multipart_threshold_mb": 5, "s3_multipart_chunk_mb": 5})
    with TestClient(create_app(down)) as c:
        name = f"big-{uuid.uuid4().hex}"
        body = {"kind": "images", "name": name, "source": {"upload": True}, "size": 11 * 1024 * 1024}
        r = c.post("/datasets", json=body, headers=auth(tenant_key))  # starting a multipart upload asks the store
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        assert r.headers["Retry-After"]
        names = [d["name"] for d in c.get("/datasets", headers=auth(tenant_key)).json()["items"]]
        assert name not in names  # nothing saved for a request that failed


def _closed_port() -> int:
    from tests.service.conftest import free_port

    return free_port()  # bound and released: nothing listens there


# --- archive safety, member by member (worker/archives.py) ----------------------------------------------------
def special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("archive", "limits", "fragment"),
    [
        (lambda: tar_with(special("calib/hard.png", tarfile.LNKTYPE, "calib/1.png")), {}, "calib/hard.png: hardlink"),
        (lambda: tar_with(special("calib/fifo", tarfile.FIFOTYPE)), {}, "calib/fifo: a device, FIFO"),
        (lambda: tar_with(special("dev/sda", tarfile.BLKTYPE)), {}, "dev/sda: a device, FIFO"),
        (lambda: tar_bytes({"a.png": b"1", "b.png": b"2", "c.png": b"3"}), {"max_members": 2}, "more than 2 members"),
        (lambda: tar_bytes({"a.png": b"1" * 600}), {"max_unpacked_bytes": 500}, "unpacks to 600 bytes"),
        (lambda: zip_bytes({"a\\..\\..\\evil.png": b"x"}), {}, "path traversal"),
        (lambda: zip_bytes({"C:/evil.png": b"x"}), {}, "absolute path"),
        (lambda: tar_bytes(images_files())[:300], {}, "damaged or truncated"),
    ],
)
def test_unsafe_members_are_refused_before_anything_is_written(archive, limits, fragment, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from worker.archives import ArchiveRefused, Limits, unpack

    path = tmp_path / "archive"
    path.write_bytes(archive())
    caps = {"max_members": 100, "max_unpacked_bytes": 10**9, "max_ratio": 100.0, **limits}
    with pytest.raises(ArchiveRefused) as refused:
        unpack(path, tmp_path / "out", Limits(**caps))
    assert any(fragment in reason for reason in refused.value.reasons), refused.value.reasons
    assert list((tmp_path / "out").iterdir()) == []
    assert {p.name for p in tmp_path.iterdir()} == {"archive", "out"}


def test_a_large_archive_goes_to_s3_in_parts(stack_settings, tenant_key, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Above the multipart threshold POST /datasets answers one presigned URL per part; the CLI PUTs them and
    completes with their ETags (S3 wants parts of >= 5 MiB, so the archive is ~11 MiB of incompressible bytes)."""
    import hashlib
    import os

    from fastapi.testclient import TestClient

    from app.main import create_app
    from hipp_client import HippClient
    from worker.cli import datasets as cli
    from worker.cli import main

    settings = stack_settings.model_copy(update={"s3_multipart_threshold_mb": 5, "s3_multipart_chunk_mb": 5})
    archive = tmp_path / "calib.tar"
    archive.write_bytes(tar_bytes({**images_files(), "calib/noise.bin": os.urandom(11 * 1024 * 1024)}, "w"))
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {tenant_key}"
        body = {"kind": "images", "name": "big", "size": archive.stat().st_size}
        upload = c.post("/datasets", json=body).json()["upload"]
        assert upload["url"] is None and len(upload["parts"]) == 3 and upload["part_size"] == 5 * 1024 * 1024
        r = c.post("/datasets", json={**body, "size": settings.dataset_upload_max_bytes + 1})
        assert r.status_code == 422 and "HIPP_DATASET_UPLOAD_MAX_BYTES" in r.json()["error"]["message"]

        def wired(args: Any) -> HippClient:
            return HippClient("http://testserver", None, http=c)

        monkeypatch.setattr(cli, "_client", wired)
        assert main(["datasets", "upload", "--kind", "images", str(archive)]) == 0
        dataset_id = capsys.readouterr().out.strip()
        bad = {"upload_id": "nope", "parts": [{"number": 1, "etag": "x"}]}
        r = c.post(f"/datasets/{create(c, tenant_key, 'images')['id']}/complete", json=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_upload_parts"
    assert validate(settings, dataset_id) == "ready"
    with session_scope(settings.resolved_database_url) as session:
        from app.models import Dataset

        row = session.get(Dataset, uuid.UUID(dataset_id))
        assert row is not None and row.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert row.counts == {"images": 3}
