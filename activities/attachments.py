"""Loading a call's attachments from the payload store, on the worker.

The workflow's call carries each file's reference only; the bytes are read
here, through the worker's own data converter (its store, its codecs), and
checked against the digest the client recorded, so a reference that points
at other bytes fails the call instead of sending them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from llmmixer.core.contracts import Attachment, ChatMessage, LlmCall

__all__ = ["AttachmentError", "load_attachment", "load_attachments"]


class AttachmentError(ValueError):
    """An attachment cannot be loaded; the message says what to do."""


async def load_attachments(call: LlmCall, converter: DataConverter) -> LlmCall:
    """``call`` with the bytes of every attachment loaded (each file once)."""
    if not any(m.attachments for m in call.messages):
        return call
    loaded: dict[str, Attachment] = {}
    messages: list[ChatMessage] = []
    for message in call.messages:
        files = []
        for attachment in message.attachments:
            if attachment.sha256 not in loaded:
                loaded[attachment.sha256] = await load_attachment(attachment, converter)
            files.append(attachment.loaded(loaded[attachment.sha256].data))
        messages.append(message.model_copy(update={"attachments": files}) if files else message)
    return call.model_copy(update={"messages": messages})


async def load_attachment(attachment: Attachment, converter: DataConverter) -> Attachment:
    """``attachment`` with its bytes, read back through the store and checked."""
    if not attachment.ref:
        raise AttachmentError(
            f"attachment {attachment.name!r} was described but never stored: start the run "
            "with `llmmixer run` or MixerClient.start, which store the file"
        )
    try:
        payload = Payload()
        payload.ParseFromString(base64.b64decode(attachment.ref, validate=True))
    except (binascii.Error, ValueError) as error:
        raise AttachmentError(
            f"attachment {attachment.name!r}: its reference is not one a client wrote "
            f"({error}): start the run again with the file as an input"
        ) from None
    try:
        [data] = await converter.decode([payload], [bytes])
    except Exception as error:
        raise AttachmentError(
            f"attachment {attachment.name!r}: the payload store could not return it "
            f"({error}): the worker needs the same LLMMIXER_PAYLOAD_* settings as the client"
        ) from None
    if not isinstance(data, bytes):
        raise AttachmentError(f"attachment {attachment.name!r}: the store holds no file there")
    if hashlib.sha256(data).hexdigest() != attachment.sha256 or len(data) != attachment.size:
        raise AttachmentError(
            f"attachment {attachment.name!r}: the stored bytes are not the file the run "
            "describes (sha256 or size differ): start the run again with the file"
        )
    return attachment.loaded(data)
