"""Request bodies are bounded by route before they are read, and bytes that are not UTF-8 are a 400.

The memory test runs `moerge serve` as a separate process (torch engine, SQLite) and streams 300 MB bodies
at it from a raw socket, with a Content-Length and chunked: anonymous POSTs to /admin/login, to the admin
register form and to POST /api/experts (and a query key's to POST /api/experts) are each refused, and the
server's peak RSS (VmHWM) grows by less than 50 MB. Before, the app-wide limit was the 8 GiB upload limit
and Litestar's CSRF middleware read the whole form before any guard ran: +625 MB per 300 MB request.
The client stops sending as soon as the server answers (the refusal closes the connection); if the
connection is reset before the answer could be read, the test still checks the server stayed small and
answers the next request.

The other tests use the app in process (SQLite and PostgreSQL): invalid UTF-8 in JSON bodies, YAML merge
bodies, form fields and archive member names, and YAML with aliases, each a 400 naming the field.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import tarfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from litestar.testing import TestClient

from api.app import create_app
from registry.store import ArtifactStore
from serving.torch_engine import TorchEngine
from tests.fixtures.db import BACKENDS, RegistryEnv, make_keys
from tests.fixtures.live import free_port

MB = 1024 * 1024
BIG = 300 * MB
UPLOAD_LIMIT = 400 * MB  # above the 300 MB: an anonymous 300 MB upload must be refused for who sends it
JSON_LIMIT = 1024 * 1024  # the default MOERGE_MAX_JSON_BYTES
BOUNDARY = "moergeBoundary7MA4YWxkTrZu0gW"
FILLER = b"a" * MB


# -- a raw HTTP/1.1 client that stops sending when the server answers ------------------------------------


@dataclass
class Answer:
    status: int | None  # None: the connection was reset before an answer could be read
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client got to send

    def json(self) -> Any:
        return json.loads(self.body)


def _pieces(total: int, prefix: bytes, suffix: bytes, chunked: bool) -> Iterator[bytes]:
    """``prefix``, filler, ``suffix``: ``total`` bytes in 1 MiB pieces (never all in memory), each framed
    as an HTTP chunk when ``chunked``."""

    def parts() -> Iterator[bytes]:
        yield prefix
        left = total - len(prefix) - len(suffix)
        while left > 0:
            yield FILLER[: min(left, MB)]
            left -= MB
        yield suffix

    for part in parts():
        if part:
            yield b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
    if chunked:
        yield b"0\r\n\r\n"


def post_stream(
    url: str,
    *,
    total: int,
    chunked: bool,
    headers: dict[str, str] | None = None,
    prefix: bytes = b"",
    suffix: bytes = b"",
) -> Answer:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {host}:{port}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    sock = socket.create_connection((host, port), timeout=60)
    sent = 0
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.setblocking(False)
        pending = b""
        pieces = _pieces(total, prefix, suffix, chunked)
        while True:
            if not pending:
                pending = next(pieces, b"")
                if not pending:
                    break
            readable, writable, _ = select.select([sock], [sock], [], 60)
            if readable:  # the server answered (or closed): stop sending
                break
            if writable:
                try:
                    count = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                pending = pending[count:]
                sent += count
        return _read_answer(sock, sent)
    finally:
        sock.close()


def _read_answer(sock: socket.socket, sent: int) -> Answer:
    sock.setblocking(True)
    sock.settimeout(60)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if found and len(body) >= int(found.group(1)):
                    break
    except (ConnectionResetError, TimeoutError):
        pass
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return Answer(None, {}, b"", sent)
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    return Answer(int(lines[0].split()[1]), {k.strip().lower(): v.strip() for k, v in fields.items()}, body, sent)


def multipart(field: str, *, filename: str | None = None, before: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """(prefix, suffix) of a multipart body whose last part ``field`` is the filler in between."""
    prefix = b""
    for name, value in (before or {}).items():
        prefix += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    kind = "\r\nContent-Type: application/octet-stream" if filename else ""
    prefix += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}{kind}\r\n\r\n".encode()
    return prefix, f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
YAML = {"content-type": "application/yaml"}


# -- `moerge serve` in its own process -----------------------------------------------------------------


@dataclass
class Live:
    url: str
    proc: subprocess.Popen[bytes]
    home: Path
    log: Path
    admin: dict[str, str]
    query: dict[str, str]
    admin_key: str

    def peak_rss(self) -> int:
        """VmHWM of the server process: the peak resident set size so far, in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        assert found is not None
        return int(found.group(1)) * 1024

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = tmp_path_factory.mktemp("body-limits") / "home"
    home.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")}
    env.update(
        MOERGE_HOME=str(home),
        MOERGE_ENGINE="torch",  # nothing heavy starts
        MOERGE_HOST="127.0.0.1",
        MOERGE_PORT=str(port),
        MOERGE_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
    )
    moerge = str(Path(sys.executable).with_name("moerge"))
    subprocess.run([moerge, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    admin, query = make_keys(f"sqlite+aiosqlite:///{home / 'moerge.db'}")
    log = home / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([moerge, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Live(
        f"http://127.0.0.1:{port}",
        proc,
        home,
        log,
        {"Authorization": f"Bearer {admin}"},
        {"Authorization": f"Bearer {query}"},
        admin,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, server.log_text()[-3000:]
            try:
                if httpx.get(f"{server.url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _signed_in(live: Live) -> dict[str, str]:
    """Headers of a signed-in admin panel session (cookies and the CSRF token)."""
    with httpx.Client(base_url=live.url) as client:
        page = client.get("/admin/login").text
        found = re.search(r'name="_csrf_token" value="([^"]+)"', page)
        assert found is not None
        resp = client.post(
            "/admin/login", data={"key": live.admin_key, "_csrf_token": found.group(1), "next": "/admin/"}
        )
        assert resp.status_code == 303, resp.text
        cookies = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
        return {"cookie": cookies, "x-csrftoken": found.group(1)}


def _strangers(live: Live, total: int) -> list[tuple[str, bool, set[int | None], Answer]]:
    """Every anonymous (or non-admin) big POST, both framings: (what, chunked, allowed statuses, answer)."""
    login = (b"key=", b"&next=%2Fadmin%2F")
    register = multipart("description", before={"mode": "upload", "slug": "x"})
    upload = multipart("archive", filename="a.tar.gz", before={"slug": "x"})
    cases: list[tuple[str, str, dict[str, str], tuple[bytes, bytes], set[int | None]]] = [
        # 413 (HTML page of the panel): the JSON limit holds on the sign-in form, checked before CSRF reads it
        ("/admin/login", "/admin/login", FORM, login, {413}),
        # 303 to the sign-in page (the panel's answer to no session), before a byte is read
        ("/admin/experts/new", "/admin/experts/new", MULTIPART, register, {303}),
        # 401 / 403 JSON: the admin key is checked before the upload is read
        ("POST /api/experts anonymous", "/api/experts", MULTIPART, upload, {401}),
        ("POST /api/experts query key", "/api/experts", {**MULTIPART, **live.query}, upload, {403}),
    ]
    answers = []
    for what, path, headers, (prefix, suffix), allowed in cases:
        for chunked in (False, True):
            answer = post_stream(
                f"{live.url}{path}", total=total, chunked=chunked, headers=headers, prefix=prefix, suffix=suffix
            )
            answers.append((what, chunked, allowed, answer))
    return answers


def test_strangers_cannot_make_the_server_read_big_bodies(live: Live) -> None:
    _strangers(live, 2 * MB)  # warm every path once (templates, parsers), so the peak below is the bodies'
    before = live.peak_rss()
    answers = _strangers(live, BIG)
    grown = live.peak_rss() - before
    for what, chunked, allowed, answer in answers:
        framing = "chunked" if chunked else "content-length"
        # None: reset before the answer could be read; the server's memory and next answer are checked below
        assert answer.status in {*allowed, None}, (what, framing, answer)
        assert answer.sent < 64 * MB, (what, framing, answer.sent)  # it stopped taking the body in early
    assert sum(answer.status is not None for *_, answer in answers) >= len(answers) // 2, answers
    assert grown < 50 * MB, f"peak RSS grew by {grown / MB:.0f} MB"
    assert httpx.get(f"{live.url}/api/health", timeout=10).status_code == 200
    log = live.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert ArtifactStore(live.home / "store").leftovers() == []


def test_json_body_over_the_limit(live: Live) -> None:
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "a" * (2 * MB)}]}).encode()
    for chunked in (False, True):
        prefix, suffix = body[:100], body[-100:]
        answer = post_stream(
            f"{live.url}/v1/chat/completions",
            total=len(body),
            chunked=chunked,
            headers={**live.query, "content-type": "application/json"},
            prefix=prefix,
            suffix=suffix,
        )
        assert answer.status == 413, answer
        error = answer.json()["error"]
        assert error["param"] == "body" and error["type"] == "invalid_request_error"
        assert str(JSON_LIMIT) in error["message"] and "MOERGE_MAX_JSON_BYTES" in error["message"]
        assert answer.headers.get("connection") == "close"
    # just under the limit is read and checked as usual (an unknown model: 404)
    small = json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    resp = httpx.post(f"{live.url}/v1/chat/completions", content=small, headers=live.query, timeout=30)
    assert resp.status_code == 404, resp.text


def test_admin_upload_over_the_limit(live: Live) -> None:
    prefix, suffix = multipart("archive", filename="a.tar.gz", before={"slug": "too-big"})
    for chunked, total in ((False, UPLOAD_LIMIT + MB), (True, UPLOAD_LIMIT + MB)):
        answer = post_stream(
            f"{live.url}/api/experts",
            total=total,
            chunked=chunked,
            headers={**MULTIPART, **live.admin},
            prefix=prefix,
            suffix=suffix,
        )
        assert answer.status == 413, answer
        error = answer.json()["error"]
        assert error["param"] == "body" and str(UPLOAD_LIMIT) in error["message"]
        assert "MOERGE_MAX_UPLOAD_BYTES" in error["message"]
    # the training-data route takes more than the JSON limit from an admin, up to 64 MiB
    answer = post_stream(
        f"{live.url}/api/experts/nothing/training-data", total=65 * MB, chunked=False, headers=live.admin
    )
    assert answer.status == 413 and "training data" in answer.json()["error"]["message"], answer
    resp = httpx.post(f"{live.url}/api/experts/nothing/training-data", content=b"x" * (2 * MB), headers=live.admin)
    assert resp.status_code == 404, resp.text  # past the JSON limit: read, then the expert is not found
    answer = post_stream(f"{live.url}/api/experts/nothing/training-data", total=2 * MB, chunked=True)
    assert answer.status == 401, answer
    # the panel's register form: a signed-in admin gets the upload limit, the page says why it was refused
    session = _signed_in(live)
    prefix, suffix = multipart("archive", filename="a.tar.gz", before={"mode": "upload", "slug": "too-big"})
    answer = post_stream(
        f"{live.url}/admin/experts/new",
        total=UPLOAD_LIMIT + MB,
        chunked=True,
        headers={**MULTIPART, **session},
        prefix=prefix,
        suffix=suffix,
    )
    assert answer.status == 413 and b"MOERGE_MAX_UPLOAD_BYTES" in answer.body, answer.status
    assert ArtifactStore(live.home / "store").leftovers() == []


# -- invalid UTF-8 and YAML aliases, in process (SQLite and PostgreSQL) ----------------------------------

# Nine levels of nine aliases: 387 million "lol"s for whatever walks the parsed document (the card's JSON
# normalisation, msgspec, the JSON encoder), from 600 bytes; hidden under fields that take any value.
LAUGHS = """\
  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  laughs: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def bounded(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float, int]:
    """The response, the seconds it took and the peak of Python's allocations meanwhile (every thread)."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        resp = call()
        return resp, time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BOTH = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


@pytest.fixture
def client(registry_env: RegistryEnv) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(create_app(registry_env.settings, engine=TorchEngine())) as client:
        yield client


def refused(resp: httpx.Response, status: int, param: str, words: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error


@BOTH
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b'{"model": "x", "messages": [{"role": "user", "content": "caf\xe9"}]}'),
        ("/v1/completions", b'{"model": "x", "prompt": "\xff\xfe"}'),
        ("/api/route", b'{"model": "x", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
        ("/api/merges", b'{"merge_method": "linear", "models": [{"model": "\xc3"}]}'),
        ("/api/experts/import", b'{"path": "/x", "expert": {"slug": "\x80"}}'),
    ],
)
def test_json_body_not_utf8(client: TestClient, registry_env: RegistryEnv, path: str, body: bytes) -> None:  # type: ignore[type-arg]
    """Was a 500: msgspec raises UnicodeDecodeError for bad bytes inside a JSON string."""
    resp = client.post(path, content=body, headers={**registry_env.admin, "content-type": "application/json"})
    refused(resp, 400, "body", "not valid UTF-8")


@BOTH
def test_yaml_merge_body_not_utf8(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    resp = client.post(
        "/api/merges",
        content="merge_method: linear\nmodels: [{model: café}]\n".encode("latin-1"),
        headers={**registry_env.admin, **YAML},
    )
    refused(resp, 400, "body", "not valid UTF-8")


@BOTH
def test_yaml_merge_body_with_aliases(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    body = f"merge_method: linear\nmodels: [{{model: a}}, {{model: b}}]\nparameters:\n{LAUGHS}".encode()
    resp, seconds, peak = bounded(
        lambda: client.post("/api/merges", content=body, headers={**registry_env.admin, **YAML})
    )
    refused(resp, 400, "body", "anchors or aliases")
    assert seconds < 5 and peak < 32 * MB
    assert client.get("/api/merges", headers=registry_env.query).json()["total"] == 0


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@BOTH
def test_card_front_matter_with_aliases(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_lora: Path,
) -> None:
    files = {p.name: p.read_bytes() for p in tiny_lora.iterdir() if p.is_file()}
    files["README.md"] = f"---\nlicense: mit\nmodel-index:\n{LAUGHS}---\n# A card\n".encode()
    archive = _tar_gz(files)
    resp, seconds, peak = bounded(
        lambda: client.post(
            "/api/experts",
            data={"slug": "laughs"},
            files={"archive": ("a.tar.gz", archive, "application/gzip")},
            headers=registry_env.admin,
        )
    )
    refused(resp, 400, "files[README.md]", "anchors or aliases")
    assert seconds < 10 and peak < 32 * MB + 4 * len(archive)
    assert registry_env.leftovers() == []


@BOTH
def test_form_fields_not_utf8(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    """A multipart text field that is not UTF-8 was a 500 (Litestar decodes it strictly, uncaught)."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="slug"\r\n\r\n'.encode()
        + b"caf\xe9\r\n"
        + f"--{BOUNDARY}--\r\n".encode()
    )
    resp = client.post("/api/experts", content=body, headers={**registry_env.admin, **MULTIPART})
    refused(resp, 400, "body", "not valid UTF-8")
    assert registry_env.leftovers() == []


@BOTH
@pytest.mark.parametrize(
    ("content", "headers"),
    [
        # a url-encoded field: Litestar turned the bytes into U+FFFD without a word
        (b"key=caf%E9&next=%2Fadmin%2F", FORM),
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="key"\r\n\r\n'.encode()
            + b"\xff\r\n"
            + f"--{BOUNDARY}--\r\n".encode(),
            MULTIPART,
        ),
    ],
    ids=["urlencoded", "multipart"],
)
def test_admin_form_not_utf8(client: TestClient, content: bytes, headers: dict[str, str]) -> None:  # type: ignore[type-arg]
    """The sign-in form, read before the CSRF check: a 400 page naming the problem, not a 500."""
    resp = client.post("/admin/login", content=content, headers=headers)
    assert resp.status_code == 400 and "not valid UTF-8" in resp.text, resp.text[:300]


@BOTH
def test_archive_member_name_not_utf8(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("x" * 10)
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    data = bytearray(raw.getvalue())
    data[:10] = b"caf\xe9.json\0\0"[:10]
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % sum(data[:512])
    resp = client.post(
        "/api/experts",
        data={"slug": "bad-name"},
        files={"archive": ("a.tar.gz", gzip.compress(bytes(data)), "application/gzip")},
        headers=registry_env.admin,
    )
    refused(resp, 400, "archive[caf\\xe9.json]", "not valid UTF-8")
    assert registry_env.leftovers() == []


@BOTH
def test_upload_of_a_pax_bomb(client: TestClient, registry_env: RegistryEnv) -> None:  # type: ignore[type-arg]
    """A pax header declaring 1 GiB (1.5 KiB on disk) through the API: 413 naming the archive."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.size, info.type = 1 << 30, tarfile.XHDTYPE
    bomb = info.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 1024
    resp = client.post(
        "/api/experts",
        data={"slug": "bomb"},
        files={"archive": ("a.tar", bomb, "application/x-tar")},
        headers=registry_env.admin,
    )
    refused(resp, 413, "archive", "extended tar header")
    assert registry_env.leftovers() == []


@BOTH
def test_signed_in_admin_uploads_past_the_json_limit(
    client: TestClient,  # type: ignore[type-arg]
    registry_env: RegistryEnv,
    tiny_base: Path,
) -> None:
    """The register form's body may pass MOERGE_MAX_JSON_BYTES once the session is checked (before, every
    body could; now only this one, and only signed in)."""
    files = {p.name: p.read_bytes() for p in tiny_base.iterdir() if p.is_file()}
    files["README.md"] = b"# Tiny\n" + os.urandom(2 * JSON_LIMIT).hex().encode()  # gzip only halves it
    archive = _tar_gz(files)
    assert len(archive) > 2 * JSON_LIMIT
    form = {"mode": "upload", "slug": "big-card"}
    upload = {"archive": ("a.tar.gz", archive, "application/gzip")}
    anonymous = client.post("/admin/experts/new", data=form, files=upload, follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/admin/login")
    page = client.get("/admin/login").text
    token = re.search(r'name="_csrf_token" value="([^"]+)"', page)
    assert token is not None
    signed_in = client.post(
        "/admin/login", data={"key": registry_env.admin_key, "_csrf_token": token.group(1), "next": "/admin/"}
    )
    assert signed_in.status_code == 200
    resp = client.post(
        "/admin/experts/new", data={**form, "_csrf_token": token.group(1)}, files=upload, follow_redirects=False
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/admin/experts/big-card", resp.text[:500]
    # the other panel forms keep the JSON limit, signed in or not
    resp = client.post(
        "/admin/experts/big-card/edit",
        data={"_csrf_token": token.group(1), "description": "x" * (2 * JSON_LIMIT)},
    )
    assert resp.status_code == 413 and "MOERGE_MAX_JSON_BYTES" in resp.text
