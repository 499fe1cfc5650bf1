"""The one HTTP load of `bisenet bench peers`: JPEG in, label map out, for every peer.

Each sender is an async () -> bool (ok) for load.closed_loop; ok means HTTP 200 *and* a label map of
the image's size came back, so a peer that answers fast with nothing useful is not counted.
"""

from __future__ import annotations

import json
import struct

import httpx

V2_HEADER = "Inference-Header-Content-Length"  # Triton's binary-tensor extension


def raw_labels_sender(client: httpx.AsyncClient, path: str, body: bytes, pixels: int, params: dict | None = None):
    """POST the encoded image as the body; the answer is H*W uint8 bytes (the service's format=raw, Ray)."""
    headers = {"Content-Type": "image/jpeg"}

    async def send() -> bool:
        try:
            r = await client.post(path, content=body, params=params, headers=headers)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and len(r.content) == pixels

    return send


def v2_image_request(model: str, image: bytes) -> tuple[str, bytes, dict]:
    """(path, body, headers) of a KServe v2 infer request: one encoded image as a BYTES tensor `IMAGE`
    in binary form (4-byte little-endian length, then the bytes), `LABELS` asked for in binary."""
    tensor = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ],
            "outputs": [{"name": "LABELS", "parameters": {"binary_data": True}}],
        }
    ).encode()
    headers = {"Content-Type": "application/octet-stream", V2_HEADER: str(len(header))}
    return f"/v2/models/{model}/infer", header + tensor, headers


def v2_labels(response: httpx.Response) -> bytes:
    """The binary LABELS of a v2 infer response; ValueError when it is not one."""
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
    size = int(response.headers.get(V2_HEADER, len(response.content)))
    header = json.loads(response.content[:size])
    offset = size
    for output in header.get("outputs", []):
        length = int(output.get("parameters", {}).get("binary_data_size", 0))
        if output["name"] == "LABELS":
            if not length:
                raise ValueError("LABELS came back as JSON, not binary")
            return response.content[offset : offset + length]
        offset += length
    raise ValueError("no LABELS in the response")


def v2_image_sender(client: httpx.AsyncClient, model: str, image: bytes, pixels: int):
    """One v2 infer with the encoded image (Triton, and the service's v2 endpoint)."""
    path, body, headers = v2_image_request(model, image)

    async def send() -> bool:
        try:
            r = await client.post(path, content=body, headers=headers)
            return len(v2_labels(r)) == pixels
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    return send
