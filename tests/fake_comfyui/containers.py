"""Tiny media files with the right container headers, for outputs Pillow cannot encode.

A client that sniffs a file's type (magic bytes) or trusts its extension must see a real MP4,
WebM, FLAC, MP3 or Ogg Opus. Encoding real audio/video would need ffmpeg; these writers emit
the container headers (and, for FLAC and Opus, complete header blocks) with little or no media
payload, which is all a batch client looks at before uploading the file.
"""

from __future__ import annotations

import struct
from pathlib import Path


def write_mp4(path: Path) -> None:
    """An ISO base media file: `ftyp` (isom, avc1), then empty `free` and `mdat` boxes."""
    brands = b"isom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"
    ftyp = struct.pack(">I", 8 + len(brands)) + b"ftyp" + brands
    path.write_bytes(ftyp + struct.pack(">I", 8) + b"free" + struct.pack(">I", 8) + b"mdat")


def _ebml_element(element_id: bytes, payload: bytes) -> bytes:
    """An EBML element with a one-byte size (payloads here are under 127 bytes)."""
    return element_id + bytes([0x80 | len(payload)]) + payload


def write_webm(path: Path) -> None:
    """A Matroska/WebM file: the EBML header (DocType "webm") and an open-ended Segment."""
    header = b"".join(
        [
            _ebml_element(b"\x42\x86", b"\x01"),  # EBMLVersion 1
            _ebml_element(b"\x42\xf7", b"\x01"),  # EBMLReadVersion 1
            _ebml_element(b"\x42\xf2", b"\x04"),  # EBMLMaxIDLength 4
            _ebml_element(b"\x42\xf3", b"\x08"),  # EBMLMaxSizeLength 8
            _ebml_element(b"\x42\x82", b"webm"),  # DocType
            _ebml_element(b"\x42\x87", b"\x04"),  # DocTypeVersion 4
            _ebml_element(b"\x42\x85", b"\x02"),  # DocTypeReadVersion 2
        ]
    )
    segment = b"\x18\x53\x80\x67" + b"\x01\xff\xff\xff\xff\xff\xff\xff"  # size unknown
    path.write_bytes(_ebml_element(b"\x1a\x45\xdf\xa3", header) + segment)


def write_glb(path: Path) -> None:
    """A binary glTF 2.0 file: the 12-byte header (`glTF`, version 2, length) and a JSON chunk
    holding only the asset record (no meshes: a client looks at the header, not the model)."""
    document = b'{"asset":{"version":"2.0","generator":"fake ComfyUI"}}'
    document += b" " * (-len(document) % 4)  # chunks are 4-byte aligned, JSON padded with spaces
    chunk = struct.pack("<I", len(document)) + b"JSON" + document
    path.write_bytes(b"glTF" + struct.pack("<II", 2, 12 + len(chunk)) + chunk)


def write_flac(path: Path, sample_rate: int, channels: int, samples: int) -> None:
    """`fLaC` and a STREAMINFO block (16-bit samples) describing the stream; no audio frames."""
    packed = (sample_rate << 44) | ((channels - 1) << 41) | ((16 - 1) << 36) | samples
    info = struct.pack(">HH", 4096, 4096) + b"\x00\x00\x00" * 2 + packed.to_bytes(8, "big")
    info += b"\x00" * 16  # MD5 of the audio: unknown
    path.write_bytes(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)


def write_mp3(path: Path) -> None:
    """An ID3v2.4 tag (empty) and one silent MPEG-1 Layer III frame (128 kb/s, 44.1 kHz)."""
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x00"
    frame_header = b"\xff\xfb\x90\x64"
    frame_length = 144 * 128000 // 44100  # 417 bytes, header included
    path.write_bytes(id3 + frame_header + b"\x00" * (frame_length - len(frame_header)))


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg_page(payload: bytes, sequence: int, header_type: int, granule: int = 0) -> bytes:
    segments = [255] * (len(payload) // 255) + [len(payload) % 255]
    head = (
        b"OggS\x00"
        + bytes([header_type])
        + struct.pack("<qII", granule, 0x636F6D66, sequence)  # serial: "comf"
        + b"\x00\x00\x00\x00"  # CRC, filled in below
        + bytes([len(segments), *segments])
    )
    page = head + payload
    crc = _ogg_crc(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def write_opus(path: Path, sample_rate: int, channels: int) -> None:
    """An Ogg Opus stream's two header pages (OpusHead, OpusTags), with valid page CRCs."""
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, channels, 312, sample_rate, 0, 0)
    vendor = b"fake-comfyui"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    path.write_bytes(_ogg_page(head, 0, 0x02) + _ogg_page(tags, 1, 0x04))
