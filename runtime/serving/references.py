"""Reference images and videos in `osx serve` requests: image-to-video, a video continued or extended.

A request carries the file itself, base64-encoded (a `data:...;base64,` URL is accepted too), in "image" or
"video", never a path: the service reads no file a client names. "condition" and "extend" are the options of
`osx generate` and the shim. The ingress decodes the upload, checks that an image decodes and that the bundle
has the VAE encoder (a 400 otherwise), and keeps the file in the job's folder; the job's recorded request
names only its size. Then the ingress runs the pipeline's own checks of the references (`check`, i.e. `Pipeline.check_references`:
the file decodes, a video has the frames its condition needs, the condition exists for this family, t2i2v
takes no reference), nothing encoded, so a bad reference is the client's 400 with the message `osx generate` prints, not a failed job.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from osx.errors import BundleError, InputError, OsxError

REFERENCE_FIELDS = ("image", "video", "condition", "extend")
UPLOADS = ("image", "video")
MAX_UPLOAD_BYTES = 8 * 2**20  # one reference file, decoded


def split_fields(fields: dict) -> tuple[dict, dict]:
    """(the fields `prepare_request` takes, the reference fields `Pipeline.run` takes)."""
    return ({k: v for k, v in fields.items() if k not in REFERENCE_FIELDS},
            {k: v for k, v in fields.items() if k in REFERENCE_FIELDS and v is not None})


def decode(fields: dict, pipeline) -> tuple[str, bytes] | None:
    """The request's upload as (kind, bytes), or None; InputError / BundleError when it cannot be used."""
    given = [k for k in UPLOADS if fields.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InputError("a reference image and a reference video were both given", hint="send one: image or video")
    kind = given[0]
    text = fields[kind]
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"field {kind!r} is not base64", hint=f"send the {kind} file's bytes base64-encoded, not a path") from None
    if not data or len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"field {kind!r} holds {len(data)} bytes; a reference file takes 1 to {MAX_UPLOAD_BYTES}")
    if "vae_encoder" not in pipeline.backends:
        raise BundleError(f"this bundle has no VAE encoder, which a reference {kind} needs",
                          hint="serve a bundle exported with `osx export ... --with-vae-encoder`")
    return kind, data


def keep(kind: str, data: bytes, folder: Path) -> Path:
    """The upload as folder/reference.<kind> (written atomically); a broken image is an InputError (the
    client's 400, not a failed job)."""
    path = folder / f"reference.{kind}"
    tmp = folder / f".reference.{secrets.token_hex(4)}.tmp"
    try:
        tmp.write_bytes(data)
        if kind == "image":
            from osx.runtime.conditioning import load_image

            load_image(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check(pipeline, request, refs: dict) -> None:
    """`Pipeline.check_references` for the request's references (`refs` as `split_fields` gives them, a kept
    file's path in "image"/"video"): InputError / BundleError with the pipeline's message, the upload named
    instead of the file it was kept in. Reads and resizes the reference (run it off the event loop)."""
    try:
        pipeline.check_references(request, **refs)
    except OsxError as e:  # the client sent bytes: its message names them, not the file they were kept in
        message = e.message
        for kind in UPLOADS:
            if refs.get(kind) is not None:
                for name in (f"reference {kind} {str(refs[kind])!r}", repr(str(refs[kind])), str(refs[kind])):
                    message = message.replace(name, f"the uploaded {kind}")
        raise type(e)(message, hint=e.hint) from None
