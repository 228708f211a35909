"""Faithful copies: transparency, colour profile, metadata and bit depth survive restoration.

Inputs are made with Pillow (a 16-bit RGB PNG by hand: Pillow writes none); every output is read
back as a viewer would (its own ICC profile, its orientation, its alpha) and compared with the
input seen the same way. The ICC profiles are Debian's free ones (tests/fixtures/icc/README.md).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageCms, ImageOps, IptcImagePlugin

from jobs import report, restore
from pipeline import colour, image_metadata, imaging
from pipeline.config import REPO_ROOT
from pipeline.inference import InferenceSettings, Restorer
from pipeline.models import build_model, read_checkpoint
from pipeline.restore.ledger import latest_per_item, read_metrics

ICC = Path(__file__).parent / "fixtures" / "icc"
CHECKPOINT = REPO_ROOT / "checkpoints" / "mimo-unet-thumb-x2.pt"
ADOBE = (ICC / "compatibleWithAdobeRGB1998.icc").read_bytes()
SRGB = (ICC / "sRGB.icc").read_bytes()
XMP_RIGHTS = b"""<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
  xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
  xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
  xmlns:exif="http://ns.adobe.com/exif/1.0/" xmpRights:Marked="True" tiff:Orientation="6"
  photoshop:City="Lisbon" exif:GPSLatitude="38,42.5N">
<dc:rights><rdf:Alt><rdf:li xml:lang="x-default">(c) 2019 City Archive</rdf:li></rdf:Alt>
</dc:rights>
</rdf:Description></rdf:RDF></x:xmpmeta>
<?xpacket end="w"?>"""


def _iim(*datasets: tuple[int, int, bytes]) -> bytes:
    return b"".join(struct.pack(">BBBH", 0x1C, r, n, len(v)) + v for r, n, v in datasets)


IPTC = _iim((1, 90, b"\x1b%G"), (2, 80, b"Ann Byline"), (2, 116, b"(c) 2019 City Archive"),
            (2, 90, b"Lisbon"), (2, 101, b"Portugal"))


def _photo(size=(40, 32), seed=0) -> np.ndarray:
    """Saturated blocks with edges: colours near the edge of Adobe RGB's gamut."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    block = (xx // 8 + 2 * (yy // 8)) % 4
    colours = np.array([[240, 20, 30], [20, 220, 40], [30, 40, 230], [235, 230, 200]])
    pixels = colours[block] + rng.integers(-8, 8, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _exif(orientation: int = 1, gps: bool = True) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[315], exif[33432], exif[270] = "Ann Artist", "(c) 2019 City Archive", "Harbour, 1931"
    exif.get_ifd(0x8769)[0x9003] = "1931:05:06 07:08:09"
    exif.get_ifd(0x8769)[0xA002], exif.get_ifd(0x8769)[0xA003] = 40, 32
    if gps:
        exif.get_ifd(0x8825).update({1: "N", 2: (38.0, 42.0, 30.0)})
    return exif


def _disc(size=(40, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A red disc with a soft edge on full transparency whose hidden colour is black."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - w / 2 + 0.5, yy - h / 2 + 0.5)
    alpha = np.clip((11.0 - r) * 128, 0, 255).astype(np.uint8)
    rgb = np.where(alpha[..., None] > 0, np.array([230, 30, 40], np.uint8), 0).astype(np.uint8)
    return rgb, alpha


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (filter None)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _inputs(folder: Path) -> None:
    folder.mkdir()
    rgb, alpha = _disc()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "logo.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(folder / "grey_alpha.png")
    palette = Image.fromarray(np.dstack([rgb, alpha]), "RGBA").convert(
        "P", palette=Image.ADAPTIVE, colors=16)
    pal = np.asarray(palette).copy()
    pal[alpha == 0] = 15
    palette = Image.fromarray(pal, "P")
    palette.putpalette(Image.fromarray(np.dstack([rgb, alpha]), "RGBA").convert(
        "P", palette=Image.ADAPTIVE, colors=16).getpalette())
    palette.save(folder / "palette.png", transparency=15)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "cutout.webp", lossless=True)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "cutout_tiff.tif")
    palette.save(folder / "anim.gif", transparency=15, save_all=True,
                 append_images=[palette.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    Image.fromarray(_photo()[..., 0]).save(folder / "grey_tagged.png",
                                           icc_profile=(ICC / "Gray.icc").read_bytes())
    photo = Image.fromarray(_photo())
    photo.save(folder / "adobe.jpg", quality=95, icc_profile=ADOBE)
    photo.save(folder / "srgb.jpg", quality=95, icc_profile=SRGB)
    photo.save(folder / "plain.jpg", quality=85)
    photo.save(folder / "exif-jpeg.jpg", quality=95, exif=_exif())
    photo.save(folder / "exif-png.png", exif=_exif())
    photo.save(folder / "rights.jpg", quality=95, xmp=XMP_RIGHTS)
    _with_iptc(folder / "rights.jpg")
    (folder / "scan16.png").write_bytes(_png16(_photo().astype(np.uint16) * 257 + 77))
    Image.fromarray(_photo()[..., 1].astype(np.uint16) * 257 + 5).save(
        folder / "grey16.png")
    # Stored sideways: the upright image is 32 wide and 40 high.
    Image.fromarray(_photo()).transpose(Image.Transpose.ROTATE_90).save(
        folder / "sideways.jpg", quality=95, exif=_exif(orientation=6))
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=95)  # Adobe's inverted CMYK
    photo.convert("CMYK").save(folder / "broken_cmyk.jpg", quality=95, icc_profile=b"not icc")
    photo.save(folder / "broken_rgb.jpg", quality=95, icc_profile=b"not an icc profile")
    ImageCms.applyTransform(photo, ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")).save(
        folder / "lab.tif")


def _with_iptc(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(imaging._with_app13(data, IPTC))


def _view(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The image as a colour-managed viewer shows it: sRGB float pixels and alpha in 0-1."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    icc = img.info.get("icc_profile")
    alpha = (np.asarray(img.convert("RGBA"))[..., 3] / 255.0 if img.mode in ("RGBA", "LA", "P")
             else np.ones(img.size[::-1]))
    if img.mode == "CMYK":
        rgb = img.convert("RGB")
    elif img.mode == "LAB":
        rgb = ImageCms.applyTransform(img, ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), colour.srgb_profile(), "LAB", "RGB"))
    elif icc:
        grey = img.mode in ("L", "LA")
        rgb = ImageCms.profileToProfile(img.convert("L" if grey else "RGB"),
                                        ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                        colour.srgb_profile(), outputMode="RGB")
    else:
        rgb = img.convert("RGB")
    return np.asarray(rgb, np.float64), alpha


def _bigger(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).resize(
        (2 * w, 2 * h), Image.BICUBIC), np.float64)


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    """The inputs restored as PNG (metadata kept), as PNG without location, and as JPEG."""
    tmp = tmp_path_factory.mktemp("faithful")
    _inputs(tmp / "in")
    outs = {}
    for name, fmt, more in (("png", "png", []), ("private", "png", ["--metadata",
                                                                     "strip-location"]),
                            ("jpeg", "jpeg", []), ("webp", "webp", [])):
        config = tmp / f"{name}.yaml"
        config.write_text(f"input: {{manifest: '{tmp / 'in'}'}}\n"
                          f"output: {{uri: '{tmp / name}', format: {fmt}}}\n")
        code = restore.main(["--config", str(config), "--device", "cpu", "--engine", "local",
                             *more])
        assert code == 0
        rows = latest_per_item(read_metrics(str(tmp / name / "metrics"))).to_pylist()
        outs[name] = {row["id"]: row for row in rows}
    return tmp, outs


def _out(row: dict) -> bytes:
    return Path(row["output_uri"]).read_bytes()


@pytest.mark.parametrize("name", ["logo", "grey_alpha", "palette", "cutout", "cutout_tiff",
                                  "anim"])
def test_transparency_is_kept_without_halo(restored, name):
    tmp, outs = restored
    row = outs["png"][name]
    assert row["status"] == "ok" and row["alpha"] == "kept"
    source = next((tmp / "in").glob(f"{name}.*")).read_bytes()
    _, alpha_in = _view(source)
    rgb_out, alpha_out = _view(_out(row))
    expected = imaging.upscale_alpha(np.rint(alpha_in * 255).astype(np.uint8)) / 255.0
    assert np.abs(alpha_out - expected).max() < 1e-9
    assert (alpha_out[expected == 0] == 0).all() and (alpha_out[expected == 1] == 1).all()
    assert (expected == 0).any() and (expected == 1).any()
    # No halo: the visible part of the soft edge keeps the disc's colour, not the black that
    # was hidden under the transparent pixels.
    edge = (alpha_out > 0.1) & (alpha_out < 0.9)
    disc = np.array([230, 30, 40]) if name != "grey_alpha" else np.array([230, 230, 230])
    assert np.abs(rgb_out[edge] - disc).mean() < 12, np.abs(rgb_out[edge] - disc).mean()


def test_jpeg_output_flattens_over_the_background_and_says_so(restored):
    _, outs = restored
    row = outs["jpeg"]["logo"]
    assert row["alpha"] == "flattened over #ffffff"
    rgb, alpha = _view(_out(row))
    assert (alpha == 1).all()
    corner = rgb[:4, :4]
    assert np.abs(corner - 255).mean() < 3  # the transparent corner is the white background
    assert outs["webp"]["logo"]["alpha"] == "kept"
    assert Image.open(io.BytesIO(_out(outs["webp"]["logo"]))).mode == "RGBA"


def test_a_wide_gamut_photo_keeps_its_colours_as_a_viewer_shows_them(restored):
    tmp, outs = restored
    changes = {}
    for name, profile in (("adobe", ADOBE), ("srgb", SRGB)):
        row = outs["png"][name]
        out = _out(row)
        assert Image.open(io.BytesIO(out)).info["icc_profile"] == profile
        assert row["colour"] == colour.KEPT
        view_in, _ = _view((tmp / "in" / f"{name}.jpg").read_bytes())
        view_out, _ = _view(out)
        changes[name] = np.abs(view_out - _bigger(view_in)).mean()
    assert outs["png"]["adobe"]["colour_profile"] == "Compatible with Adobe RGB (1998)"
    # The model's own change on the Adobe RGB photo is no larger than on the sRGB control (the
    # issue measured 12.6 against 2.2 levels when the profile was ignored).
    assert changes["adobe"] < changes["srgb"] + 1.5, changes


@pytest.mark.parametrize("name, handling", [
    ("cmyk", "converted from CMYK without a profile (naive formula)"),
    ("lab", "converted to sRGB from Lab"),
    ("grey_tagged", "converted to sRGB from grey")])
def test_cmyk_and_lab_become_rgb(restored, name, handling):
    tmp, outs = restored
    row = outs["png"][name]
    assert row["status"] == "ok" and row["colour"] == handling
    view_in, _ = _view(next((tmp / "in").glob(f"{name}.*")).read_bytes())
    view_out, _ = _view(_out(row))
    assert np.abs(view_out - _bigger(view_in)).mean() < 8


def test_a_broken_profile_is_an_error_row_or_carried(restored):
    _, outs = restored
    broken = outs["png"]["broken_cmyk"]
    assert broken["status"] == "error"
    assert broken["error"].startswith("decode: ImageError: embedded ICC profile is unreadable")
    carried = outs["png"]["broken_rgb"]
    assert carried["status"] == "ok"
    assert carried["colour"] == "unreadable profile carried unchanged"
    assert Image.open(io.BytesIO(_out(carried))).info["icc_profile"] == b"not an icc profile"


@pytest.mark.parametrize("name", ["exif-jpeg", "exif-png"])
def test_exif_is_carried_and_made_true(restored, name):
    _, outs = restored
    row = outs["png"][name]
    assert "exif" in row["metadata_kept"]
    exif = Image.open(io.BytesIO(_out(row))).getexif()
    assert (exif[315], exif[33432], exif[270]) == ("Ann Artist", "(c) 2019 City Archive",
                                                   "Harbour, 1931")
    assert exif.get_ifd(0x8769)[0x9003] == "1931:05:06 07:08:09"
    assert (exif.get_ifd(0x8769)[0xA002], exif.get_ifd(0x8769)[0xA003]) == (80, 64)
    assert exif[0x0112] == 1 and exif.get_ifd(0x8825)[1] == "N"
    private = Image.open(io.BytesIO(_out(outs["private"][name]))).getexif()
    assert private[315] == "Ann Artist" and not private.get_ifd(0x8825)
    assert "exif GPS (output.metadata strip-location)" in outs["private"][name][
        "metadata_dropped"]


def test_a_sideways_photo_is_upright_once(restored):
    _, outs = restored
    row = outs["png"]["sideways"]
    img = Image.open(io.BytesIO(_out(row)))
    # Stored 32x40 with orientation 6: upright it is 40x32, and the copy 80x64, orientation 1.
    assert img.size == (80, 64) and img.getexif()[0x0112] == 1
    changes = []
    for name in ("sideways", "exif-jpeg"):  # the same photo, stored upright
        view, _ = _view(_out(outs["png"][name]))
        upright, _ = _view((restored[0] / "in" / f"{name}.jpg").read_bytes())
        changes.append(np.abs(view - _bigger(upright)).mean())
    assert changes[0] < changes[1] + 1.5, changes  # turned upright once, not twice


def test_xmp_rights_and_iptc_are_carried_with_provenance(restored, official_sha=None):
    _, outs = restored
    for fmt in ("png", "jpeg"):
        row = outs[fmt]["rights"]
        out = Image.open(io.BytesIO(_out(row)))
        xmp = out.info.get("xmp") or out.info["XML:com.adobe.xmp"]
        xmp = xmp if isinstance(xmp, bytes) else xmp.encode()
        assert b"(c) 2019 City Archive" in xmp and b"Lisbon" in xmp
        assert b'Orientation' not in xmp  # the stale tiff:Orientation="6" is gone
        assert image_metadata.DIGITAL_SOURCE_TYPE.encode() in xmp
        assert row["checkpoint_sha256"].encode() in xmp and row["run_id"].encode() in xmp
        assert sorted(row["metadata_kept"]) == ["iptc", "xmp"]
        blocks, _ = image_metadata.read_blocks(out)
        datasets = {(r, n): v for r, n, v in image_metadata._iim_datasets(blocks["iptc"])}
        assert datasets[2, 116] == b"(c) 2019 City Archive" and datasets[2, 90] == b"Lisbon"
    jpeg = Image.open(io.BytesIO(_out(outs["jpeg"]["rights"])))
    assert IptcImagePlugin.getiptcinfo(jpeg)[(2, 80)] == b"Ann Byline"
    private = outs["private"]["rights"]
    out = Image.open(io.BytesIO(_out(private)))
    xmp = out.info["XML:com.adobe.xmp"].encode()
    assert b"(c) 2019 City Archive" in xmp and b"Lisbon" not in xmp and b"GPS" not in xmp
    blocks, _ = image_metadata.read_blocks(out)
    datasets = {(r, n) for r, n, _ in image_metadata._iim_datasets(blocks["iptc"])}
    assert (2, 116) in datasets and (2, 90) not in datasets and (2, 101) not in datasets
    assert "iptc (webp output has no place for it)" in outs["webp"]["rights"]["metadata_dropped"]
    webp = Image.open(io.BytesIO(_out(outs["webp"]["exif-jpeg"])))
    assert webp.getexif()[33432] == "(c) 2019 City Archive" and b"Iptc4xmpExt" in webp.info["xmp"]


def test_every_output_says_how_it_was_made(restored):
    _, outs = restored
    row = outs["png"]["srgb"]  # an input without any metadata
    xmp = Image.open(io.BytesIO(_out(row))).info["XML:com.adobe.xmp"]
    root = image_metadata.parse_xmp(xmp.encode())
    values = {el.tag.split("}")[1]: el.text for el in root.iter() if el.text and el.text.strip()}
    assert values["DigitalSourceType"] == image_metadata.DIGITAL_SOURCE_TYPE
    assert values["CreatorTool"].startswith("mimo-restore ")
    assert values["Model"] == "mimo-unet" and values["RunID"] == row["run_id"]
    assert values["CheckpointSHA256"] == row["checkpoint_sha256"]


def test_sixteen_bit_inputs_give_sixteen_bit_png(restored):
    tmp, outs = restored
    for name in ("scan16", "grey16"):
        row = outs["png"][name]
        assert row["bit_depth"] == 16
        out = imaging.read(_out(row))
        assert out.depth == 16
        # Quantised from the float output: most values are not an 8-bit level widened.
        assert (out.rgb % 257 != 0).mean() > 0.5
        source = imaging.read((tmp / "in" / f"{name}.png").read_bytes())
        assert source.depth == 16
        change = np.abs(out.rgb / 257.0 - _bigger(imaging.to_8bit(source.rgb))).mean()
        assert change < 8
    assert outs["jpeg"]["scan16"]["bit_depth"] == 8


def test_the_record_reads_with_duckdb(restored):
    tmp, _ = restored
    rows = duckdb.sql(
        f"select alpha, colour, count(*) as n, sum(len(metadata_kept)) as kept "
        f"from read_parquet('{tmp / 'png' / 'metrics'}/*.parquet') where status = 'ok' "
        f"group by all order by all").fetchall()
    by_alpha = {}
    for alpha, _, n, _ in rows:
        by_alpha[alpha] = by_alpha.get(alpha, 0) + n
    inputs = len(list((tmp / "in").iterdir()))
    assert by_alpha["kept"] == 6 and by_alpha["none"] == inputs - 6 - 1  # broken_cmyk: error
    files = list((tmp / "png" / "metrics").glob("*.parquet"))
    assert pq.read_schema(files[0]).field("metadata_kept").type.value_type == "string"


def test_a_plain_thumbnails_output_has_the_bare_paths_pixels(restored):
    """Pixels as the 2026-12-04 release made them: Pillow's decode, the bicubic, the model."""
    tmp, outs = restored
    data = (tmp / "in" / "plain.jpg").read_bytes()
    bare = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    restorer = Restorer(build_model("mimo-unet", read_checkpoint(str(CHECKPOINT))),
                        torch.device("cpu"), InferenceSettings())
    expected = restorer.restore([imaging.upscale2x(bare)])[0]
    row = outs["png"]["plain"]
    assert (row["alpha"], row["colour"], row["bit_depth"]) == ("none", colour.UNTAGGED, 8)
    assert (np.asarray(Image.open(io.BytesIO(_out(row)))) == expected).all()


def test_plain_srgb_thumbnails_keep_their_pixels(tmp_path):
    """The common case decodes to the same pixels as before: no profile, no alpha, 8 bits."""
    photo = _photo()
    data = io.BytesIO()
    Image.fromarray(photo).save(data, "JPEG", quality=90)
    image = imaging.read(data.getvalue())
    assert image.alpha is None and image.icc is None and image.colour == colour.UNTAGGED
    assert (image.rgb == np.asarray(Image.open(io.BytesIO(data.getvalue())).convert("RGB"))).all()


def test_bleed_fills_only_hidden_colour():
    rgb, alpha = _disc()
    filled = imaging.bleed(rgb, alpha > 0)
    assert (filled[alpha > 0] == rgb[alpha > 0]).all()
    assert np.abs(filled[alpha == 0].astype(int) - [230, 30, 40]).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(orientation):
    data = io.BytesIO()
    Image.fromarray(_photo((12, 8))).save(data, "PNG", exif=_exif(orientation))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data.getvalue()))))
    assert (imaging.read(data.getvalue()).rgb == expected).all()


def test_the_report_counts_handling_and_shows_transparency_on_a_checkerboard(restored):
    tmp, outs = restored
    page = tmp / "report.html"
    assert report.main([str(tmp / "png"), "--html", str(page)]) == 0
    text = page.read_text()
    assert "What the copies kept" in text and "class='checker'" in text
    kept = sum(row["colour"] == colour.KEPT for row in outs["png"].values())
    assert f"<tr><td>{colour.KEPT}</td><td class=n>{kept}</td></tr>" in text
    untagged = sum(row["status"] == "ok" and row["colour_profile"] is None
                   for row in outs["png"].values())
    assert f"<tr><td>none (untagged)</td><td class=n>{untagged}</td></tr>" in text


def _tiff16(pixels: np.ndarray) -> bytes:
    """An uncompressed 16-bit RGB TIFF written by hand (little-endian, one strip)."""
    h, w, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, 8 + len(data)), (259, 3, 1, 1),
               (262, 3, 1, 2), (273, 4, 1, 8), (277, 3, 1, 3), (278, 3, 1, h),
               (279, 4, 1, len(data))]
    ifd_at = 8 + len(data) + 6
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) if kind == 4 or count > 1
        else struct.pack("<HHIHH", tag, kind, count, value, 0)
        for tag, kind, count, value in entries) + struct.pack("<I", 0)
    return (b"II*\x00" + struct.pack("<I", ifd_at) + data + struct.pack("<HHH", 16, 16, 16)
            + ifd)


def test_a_sixteen_bit_rgb_tiff_is_read_at_sixteen_bits():
    pixels = np.random.default_rng(3).integers(0, 65536, (6, 9, 3)).astype(np.uint16)
    image = imaging.read(_tiff16(pixels))
    assert image.depth == 16 and (image.rgb == pixels).all()
    grey = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(grey, "TIFF")
    assert (imaging.read(grey.getvalue()).rgb[..., 0] == pixels[..., 0]).all()


def test_a_profile_of_another_colour_space_on_cmyk_is_an_error():
    data = io.BytesIO()
    Image.fromarray(_photo()).convert("CMYK").save(data, "JPEG", icc_profile=SRGB)
    with pytest.raises(imaging.ImageError, match="profile is for RGB, not the image's CMYK"):
        imaging.read(data.getvalue())


def test_a_background_must_be_a_colour(tmp_path):
    from pipeline.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="#rrggbb"):
        load_config(None, {"output.background": "white"})
    assert load_config(None, {"output.background": "#FFEEDD"}).output.background_rgb == (
        255, 238, 221)
