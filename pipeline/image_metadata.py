"""What an image carries besides pixels and colour: EXIF, XMP and IPTC-IIM. Read from any input
format, made true for the restored copy (upright, its own size, no stale preview), optionally
stripped of location or of everything, and given the copy's provenance in XMP.

The blocks travel as bytes: ``exif`` is a TIFF structure without the ``Exif\\0\\0`` header,
``xmp`` an XMP packet, ``iptc`` IPTC-IIM datasets (Photoshop's resource 0x0404).
"""

from __future__ import annotations

import functools
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field

from PIL import Image

BLOCKS = ("exif", "xmp", "iptc")
POLICIES = ("keep", "strip-location", "strip")

# IPTC's digital source type for "modification or correction by algorithm without changing the
# main content of the media ... such as sharpening or applying noise reduction": what a
# deblurring network does. Not compositeWithTrainedAlgorithmicMedia, which the vocabulary keeps
# for generative edits (inpainting, outpainting) that add content the original did not have.
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/algorithmicallyEnhanced"
PROVENANCE_NS = "https://github.com/mimo-restore/ns/provenance/1.0/"

EXIF_HEADER = b"Exif\x00\x00"
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
# IFD0 tags that describe a file's own layout (strips, tiles, samples, compression, resolution,
# embedded blocks carried on their own) rather than the photograph: a TIFF input has them in
# its IFD0, and they would be false in the copy (twice the pixels at the same resolution would
# print twice the size).
_LAYOUT_TAGS = {254, 255, 256, 257, 258, 259, 262, 273, 277, 278, 279, 282, 283, 284, 296, 317,
                320, 322, 323,
                324, 325, 338, 339, 340, 341, 513, 514, 530, 531, 532, 700, 33723, 34377, 34675,
                0xA005, _EXIF_IFD, _GPS_IFD}
_ORIENTATION, _PIXEL_X, _PIXEL_Y, _MAKER_NOTE = 0x0112, 0xA002, 0xA003, 0x927C
_MAX_XMP = 1 << 20  # larger packets are dropped (and recorded) rather than parsed


@dataclass
class Carried:
    """The blocks for the output and what happened to the input's."""

    blocks: dict[str, bytes] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


# --- reading -------------------------------------------------------------------------------

def read_blocks(img: Image.Image) -> tuple[dict[str, bytes], list[str]]:
    """The EXIF, XMP and IPTC of ``img`` as read by Pillow from any format, and the names of the
    blocks that were present but unreadable."""
    blocks, unreadable = {}, []
    info = img.info
    tags = getattr(img, "tag_v2", None)
    try:
        # Only EXIF the file has: Pillow's getexif() also makes one up from XMP's orientation.
        exif = img.getexif() if "exif" in info or tags else Image.Exif()
        if len(exif) or exif.get_ifd(_EXIF_IFD):
            data = exif.tobytes()
            blocks["exif"] = data[len(EXIF_HEADER):] if data.startswith(EXIF_HEADER) else data
    except Exception:
        unreadable.append("exif")
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp") or (tags.get(700) if tags else None)
    if xmp:
        blocks["xmp"] = xmp.encode() if isinstance(xmp, str) else bytes(xmp)
    iptc = _read_iptc(info, tags)
    if iptc:
        blocks["iptc"] = iptc
    return blocks, unreadable


def _read_iptc(info: Mapping, tags) -> bytes | None:
    photoshop = info.get("photoshop")
    if isinstance(photoshop, dict) and photoshop.get(0x0404):
        return bytes(photoshop[0x0404])
    if tags and tags.get(33723):
        value = tags[33723]
        if isinstance(value, bytes):
            return value
        if isinstance(value, tuple):  # some writers declare it LONG: the same bytes, as words
            return b"".join(struct.pack(f"{'<' if tags._endian == '<' else '>'}I", v)
                            for v in value)
    raw = info.get("Raw profile type iptc")
    if isinstance(raw, str):  # ImageMagick's and ExifTool's PNG text: name, length, hex
        try:
            return bytes.fromhex("".join(raw.split("\n")[3:]).replace(" ", ""))
        except ValueError:
            return None
    return None


# --- made true for the copy ----------------------------------------------------------------

def carry(blocks: Mapping[str, bytes], policy: str, size: tuple[int, int]) -> Carried:
    """The input's blocks as the output (of ``size``, upright) carries them under ``policy``."""
    out = Carried()
    if policy == "strip":
        out.dropped += [f"{name} (output.metadata strip)" for name in BLOCKS if name in blocks]
        return out
    strip_location = policy == "strip-location"
    for name, fix in (("exif", _true_exif), ("xmp", _true_xmp), ("iptc", _true_iptc)):
        if name not in blocks:
            continue
        try:
            data, notes = fix(blocks[name], size, strip_location)
        except Exception as e:
            out.dropped.append(f"{name} (unreadable: {type(e).__name__})")
            continue
        out.dropped += notes
        if data:
            out.blocks[name] = data
            out.kept.append(name)
    return out


def _true_exif(data: bytes, size: tuple[int, int], strip_location: bool):
    source = Image.Exif()
    source.load(EXIF_HEADER + data)
    exif, notes = Image.Exif(), []
    for tag, value in source.items():
        if tag not in _LAYOUT_TAGS:
            exif[tag] = value
    if not len(exif) and not source.get_ifd(_EXIF_IFD) and not source.get_ifd(_GPS_IFD):
        return None, []  # nothing but layout: no EXIF to carry
    exif[_ORIENTATION] = 1  # the pixels were turned upright when decoded
    sub = {k: v for k, v in source.get_ifd(_EXIF_IFD).items() if k != 0xA005}
    if _MAKER_NOTE in sub:
        del sub[_MAKER_NOTE]  # its offsets point into the original file
        notes.append("exif maker note (offsets into the original file)")
    if sub:
        sub[_PIXEL_X], sub[_PIXEL_Y] = size
        exif.get_ifd(_EXIF_IFD).update(sub)
    gps = source.get_ifd(_GPS_IFD)
    if gps and strip_location:
        notes.append("exif GPS (output.metadata strip-location)")
    elif gps:
        exif.get_ifd(_GPS_IFD).update(gps)
    # Only IFD0 and its sub-IFDs are written: the embedded preview (IFD1) is not carried.
    out = exif.tobytes()
    return out[len(EXIF_HEADER):], notes


_NS = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "x": "adobe:ns:meta/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "Iptc4xmpCore": "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "mimo": PROVENANCE_NS,
}
_STALE = {("tiff", "Orientation"), ("tiff", "ImageWidth"), ("tiff", "ImageLength"),
          ("exif", "PixelXDimension"), ("exif", "PixelYDimension")}
_PROVENANCE_PROPS = {("xmp", "CreatorTool"), ("xmp", "MetadataDate"), ("xmp", "ModifyDate"),
                     ("Iptc4xmpExt", "DigitalSourceType")}
_LOCATION = {("photoshop", "City"), ("photoshop", "State"), ("photoshop", "Country"),
             ("Iptc4xmpCore", "Location"), ("Iptc4xmpCore", "CountryCode"),
             ("Iptc4xmpExt", "LocationCreated"), ("Iptc4xmpExt", "LocationShown")}


def _qname(prefix: str, local: str) -> str:
    return f"{{{_NS[prefix]}}}{local}"


def _true_xmp(data: bytes, size, strip_location: bool):
    if len(data) > _MAX_XMP:
        return None, [f"xmp (larger than {_MAX_XMP} bytes)"]
    root = parse_xmp(data)
    stale = {_qname(*p) for p in _STALE | _PROVENANCE_PROPS}
    _remove_properties(root, lambda name: name in stale)
    location = {_qname(*p) for p in _LOCATION}
    gps = f"{{{_NS['exif']}}}GPS"
    removed = strip_location and _remove_properties(
        root, lambda name: name in location or name.startswith(gps))
    notes = ["xmp location (output.metadata strip-location)"] if removed else []
    return _serialise(root), notes


def parse_xmp(data: bytes) -> ET.Element:
    """The XMP packet's ``x:xmpmeta`` element (an ``rdf:RDF`` alone is wrapped in one)."""
    text = data.decode("utf-8", errors="strict").lstrip("\ufeff")
    start = text.find("<x:xmpmeta")
    if start < 0:
        start = text.find("<rdf:RDF")
    end = max(text.rfind("</x:xmpmeta>") + len("</x:xmpmeta>") if "</x:xmpmeta>" in text else -1,
              text.rfind("</rdf:RDF>") + len("</rdf:RDF>") if "</rdf:RDF>" in text else -1)
    if start < 0 or end <= start:
        raise ValueError("no XMP packet")
    body = text[start:end]
    for prefix, uri in re.findall(r'xmlns:([\w.-]+)\s*=\s*["\']([^"\']*)["\']', body):
        try:
            ET.register_namespace(prefix, uri)
        except ValueError:  # a prefix ElementTree reserves (ns0, ...): it picks its own
            pass
    root = ET.fromstring(body)
    if root.tag == _qname("rdf", "RDF"):
        wrapper = ET.Element(_qname("x", "xmpmeta"))
        wrapper.append(root)
        root = wrapper
    return root


def _remove_properties(root: ET.Element, doomed) -> list[str]:
    """Removes each property (an attribute or a child element of an ``rdf:Description``) whose
    qualified name ``doomed`` accepts; returns the names removed."""
    removed = []
    for desc in root.iter(_qname("rdf", "Description")):
        for name in [a for a in desc.attrib if doomed(a)]:
            del desc.attrib[name]
            removed.append(name)
        for child in [c for c in desc if doomed(c.tag)]:
            desc.remove(child)
            removed.append(child.tag)
    return removed


def _serialise(root: ET.Element) -> bytes:
    for prefix in ("x", "rdf"):
        ET.register_namespace(prefix, _NS[prefix])
    body = ET.tostring(root, encoding="unicode")
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n' + body
            + '\n<?xpacket end="w"?>').encode("utf-8")


_LOCATION_DATASETS = {26, 27, 90, 92, 95, 100, 101}  # record 2: locations, city ... country


def _true_iptc(data: bytes, size, strip_location: bool):
    datasets = list(_iim_datasets(data))
    kept = [d for d in datasets if not (strip_location and d[0] == 2 and d[1] in
                                        _LOCATION_DATASETS)]
    notes = (["iptc location (output.metadata strip-location)"]
             if len(kept) < len(datasets) else [])
    return b"".join(_iim_dataset(*d) for d in kept), notes


def _iim_datasets(data: bytes):
    i = 0
    while i < len(data):
        if data[i] != 0x1C:
            if not data[i:].strip(b"\x00"):  # Photoshop pads the resource to an even size
                return
            raise ValueError(f"IPTC-IIM: no tag marker at byte {i}")
        record, number, length = data[i + 1], data[i + 2], struct.unpack(">H", data[i + 3:i + 5])[0]
        i += 5
        if length & 0x8000:  # an extended dataset: the length's length, then the length
            n = length & 0x7FFF
            length, i = int.from_bytes(data[i:i + n], "big"), i + n
        if i + length > len(data):
            raise ValueError("IPTC-IIM: a dataset runs past the end")
        yield record, number, data[i:i + length]
        i += length


def _iim_dataset(record: int, number: int, value: bytes) -> bytes:
    if len(value) < 0x8000:
        return struct.pack(">BBBH", 0x1C, record, number, len(value)) + value
    return struct.pack(">BBBHI", 0x1C, record, number, 0x8004, len(value)) + value


# --- provenance -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Provenance:
    tool: str  # "mimo-restore 0.2.0"
    model: str
    checkpoint_sha256: str | None
    run_id: str


def with_provenance(xmp: bytes | None, provenance: Provenance) -> bytes:
    """``xmp`` (already made true by :func:`carry`, or None) with a description of how the copy
    was made: the tool, IPTC's digital source type, the model, checkpoint and run. (No dates:
    the run id names the run's start, and the packet of an input without XMP is then the same
    for a whole run, made once.)"""
    return _provenance_alone(provenance) if not xmp else _with_provenance(xmp, provenance)


@functools.lru_cache(maxsize=8)
def _provenance_alone(provenance: Provenance) -> bytes:
    return _with_provenance(None, provenance)


def _with_provenance(xmp: bytes | None, provenance: Provenance) -> bytes:
    root = parse_xmp(xmp) if xmp else ET.Element(_qname("x", "xmpmeta"))
    rdf = root.find(_qname("rdf", "RDF"))
    if rdf is None:
        rdf = ET.SubElement(root, _qname("rdf", "RDF"))
    for prefix in ("xmp", "Iptc4xmpExt", "mimo"):
        ET.register_namespace(prefix, _NS[prefix])
    _remove_properties(root, lambda name: name.startswith(f"{{{PROVENANCE_NS}}}"))
    desc = ET.SubElement(rdf, _qname("rdf", "Description"), {_qname("rdf", "about"): ""})
    for (prefix, local), value in (
            (("xmp", "CreatorTool"), provenance.tool),
            (("Iptc4xmpExt", "DigitalSourceType"), DIGITAL_SOURCE_TYPE),
            (("mimo", "Process"), "2x bicubic upscale, restored by a trained network"),
            (("mimo", "Model"), provenance.model),
            (("mimo", "CheckpointSHA256"), provenance.checkpoint_sha256 or "none (random weights)"),
            (("mimo", "RunID"), provenance.run_id)):
        ET.SubElement(desc, _qname(prefix, local)).text = value
    return _serialise(root)
